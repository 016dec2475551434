"""The evaluator network: a CNN image tower with a CLIP head and an attribute head, and a
small transformer text tower. Own architecture and seed; never conditions the generators."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

N_CELLS = 9  # the 3x3 grid of positions (world.vocab.POSITIONS order)


@dataclass(frozen=True)
class EvaluatorConfig:
    vocab_size: int
    n_shapes: int = 7
    n_colors: int = 10
    n_sizes: int = 2
    channels: tuple[int, ...] = (32, 64, 96, 128)
    feature_dim: int = 256  # image features used for FID
    embed_dim: int = 128  # joint image-text space
    text_dim: int = 128
    text_layers: int = 2
    text_heads: int = 4
    max_len: int = 48
    image_size: int = 64

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> EvaluatorConfig:
        d = dict(d)
        d["channels"] = tuple(d["channels"])
        return cls(**d)

    @property
    def cell_logits(self) -> int:
        return 1 + self.n_shapes + self.n_colors + self.n_sizes


def _conv(i: int, o: int, stride: int = 1, k: int = 3) -> list[nn.Module]:
    return [nn.Conv2d(i, o, k, stride, k // 2, bias=False), nn.BatchNorm2d(o), nn.GELU()]


# Centres of the 3x3 grid cells as fractions of the image (x, y), in world.vocab.POSITIONS
# order: left, right, top, bottom, center, top left, top right, bottom left, bottom right.
_G = (0.22, 0.5, 0.78)
CELL_XY = (
    (_G[0], _G[1]),
    (_G[2], _G[1]),
    (_G[1], _G[0]),
    (_G[1], _G[2]),
    (_G[1], _G[1]),
    (_G[0], _G[0]),
    (_G[2], _G[0]),
    (_G[0], _G[2]),
    (_G[2], _G[2]),
)
ROI = 4  # ROI-align samples per side around each cell centre
ROI_HALF = 0.18  # half-width of the sampled window, as a fraction of the image


class ImageTower(nn.Module):
    """64x64 RGB in [-1, 1] -> 8x8 feature map.

    * feature vector (FID): 1x1 conv, flatten (keeps where things are), linear -> feature_dim;
    * CLIP embedding: MLP of the feature vector;
    * attributes: one detector head shared by the 9 grid cells, reading a ROI-aligned window
      of the map around each cell centre (+ a learned cell embedding): presence, shape,
      color, size per cell; background from the feature vector.
    """

    def __init__(self, cfg: EvaluatorConfig) -> None:
        super().__init__()
        a, b, c, d = cfg.channels
        self.body = nn.Sequential(
            *_conv(3, a, 2, 5),  # 32x32
            *_conv(a, b, 2),  # 16x16
            *_conv(b, c),
            *_conv(c, d, 2),  # 8x8
            *_conv(d, d),
        )
        side = cfg.image_size // 8
        self.flat = nn.Sequential(nn.Conv2d(d, 32, 1), nn.GELU(), nn.Flatten())
        self.feature = nn.Linear(32 * side * side, cfg.feature_dim)
        self.clip_head = nn.Sequential(nn.GELU(), nn.Linear(cfg.feature_dim, cfg.embed_dim))
        self.background_head = nn.Sequential(nn.GELU(), nn.Linear(cfg.feature_dim, cfg.n_colors))
        self.cell_reduce = nn.Sequential(nn.Conv2d(d, 64, 1), nn.GELU())
        self.cell_in = nn.Linear(64 * ROI * ROI, 256)
        self.cell_embed = nn.Parameter(torch.zeros(N_CELLS, 256))
        self.cell_out = nn.Sequential(nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, cfg.cell_logits))
        offsets = torch.linspace(-ROI_HALF, ROI_HALF, ROI)
        oy, ox = torch.meshgrid(offsets, offsets, indexing="ij")
        centres = torch.tensor(CELL_XY)
        gx = centres[:, 0, None, None] + ox  # (9, ROI, ROI)
        gy = centres[:, 1, None, None] + oy
        grid = torch.stack([gx, gy], -1).reshape(1, N_CELLS * ROI, ROI, 2) * 2 - 1
        self.register_buffer("roi_grid", grid, persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fmap = self.body(x)
        feats = self.feature(self.flat(fmap))
        small = self.cell_reduce(fmap)
        b = x.shape[0]
        rois = F.grid_sample(small, self.roi_grid.expand(b, -1, -1, -1), align_corners=False)
        rois = rois.reshape(b, 64, N_CELLS, ROI * ROI).permute(0, 2, 1, 3).reshape(b, N_CELLS, -1)
        cells = self.cell_out(self.cell_in(rois) + self.cell_embed)  # (B, 9, cell_logits)
        attrs = torch.cat([cells.reshape(b, -1), self.background_head(feats)], dim=1)
        return feats, self.clip_head(feats), attrs


class TextTower(nn.Module):
    def __init__(self, cfg: EvaluatorConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.text_dim, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(cfg.max_len, cfg.text_dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            cfg.text_dim,
            cfg.text_heads,
            2 * cfg.text_dim,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.text_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.text_dim)
        self.proj = nn.Linear(cfg.text_dim, cfg.embed_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids) + self.pos[: ids.shape[1]]
        h = self.encoder(h, src_key_padding_mask=ids == 0)
        return self.proj(self.norm(h[:, 0]))


class EvaluatorNet(nn.Module):
    def __init__(self, cfg: EvaluatorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.image = ImageTower(cfg)
        self.text = TextTower(cfg)
        self.logit_scale = nn.Parameter(torch.tensor(2.659))  # ln(1/0.07), as CLIP

    def split_attr(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        cells = logits[:, : N_CELLS * cfg.cell_logits].reshape(-1, N_CELLS, cfg.cell_logits)
        s, c = cfg.n_shapes, cfg.n_colors
        return {
            "present": cells[..., 0],
            "shape": cells[..., 1 : 1 + s],
            "color": cells[..., 1 + s : 1 + s + c],
            "size": cells[..., 1 + s + c :],
            "background": logits[:, N_CELLS * cfg.cell_logits :],
        }

    @staticmethod
    def normalize(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1)
