"""Training utilities: seeded RNG, resumable checkpoints (safetensors + json), loss logs, EMA, LR."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def cosine_lr(step: int, total: int, base: float, warmup: int, min_ratio: float = 0.1) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def adamw(params, lr: float, weight_decay: float, device: str | torch.device = "cpu") -> torch.optim.AdamW:
    """AdamW; on CUDA the fused kernel (one launch for all parameters instead of a few per tensor)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=torch.device(device).type == "cuda")


class EMA:
    """Exponential moving average of a module's float parameters (with the usual warm-up)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        fused_shadow, fused_values = [], []
        for k, v in module.state_dict().items():
            if v.dtype == self.shadow[k].dtype and v.device == self.shadow[k].device:
                fused_shadow.append(self.shadow[k])
                fused_values.append(v.detach())
            elif v.dtype.is_floating_point:
                self.shadow[k].mul_(d).add_(v.detach().float(), alpha=1 - d)
            else:
                self.shadow[k].copy_(v)
        if fused_shadow:
            # One multi-tensor kernel for all fp32 tensors (a U-Net has hundreds): shadow += (1-d)(v - shadow).
            torch._foreach_lerp_(fused_shadow, fused_values, 1 - d)

    def copy_to(self, module: torch.nn.Module) -> None:
        module.load_state_dict({k: v.to(module.state_dict()[k].dtype) for k, v in self.shadow.items()})


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{idx}.{key}"] = t.detach().cpu().reshape(-1).contiguous().clone()
    return tensors, {"param_groups": sd["param_groups"]}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    current = opt.state_dict()
    state: dict[int, dict] = {}
    for name, t in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = t.reshape(()) if key == "step" else t
    # Shapes of moment tensors: take them from the parameters.
    params = [p for g in opt.param_groups for p in g["params"]]
    for idx, s in state.items():
        for key in ("exp_avg", "exp_avg_sq"):
            if key in s:
                s[key] = s[key].reshape(params[idx].shape)
    groups = meta["param_groups"]
    for g, cur in zip(groups, current["param_groups"]):
        g["params"] = cur["params"]
    opt.load_state_dict({"state": state, "param_groups": groups})


class Checkpoint:
    """A stage's resumable state under `folder`: modules, optimizer, EMA (safetensors) + json."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    @property
    def state_path(self) -> Path:
        return self.folder / "state.json"

    def exists(self) -> bool:
        return self.state_path.exists()

    def state(self) -> dict:
        return json.loads(self.state_path.read_text()) if self.exists() else {}

    def save(self, state: dict, modules: dict[str, torch.nn.Module], opt=None, ema: EMA | None = None, *,
             optimizers: dict[str, torch.optim.Optimizer] | None = None, emas: dict[str, EMA] | None = None) -> None:
        """Save modules, optimizers and EMAs; `opt` / `ema` are the ones named "optimizer" / "ema"
        (a stage that trains one model), `optimizers` / `emas` any further ones by name."""
        self.folder.mkdir(parents=True, exist_ok=True)
        optimizers = {**({"optimizer": opt} if opt is not None else {}), **(optimizers or {})}
        emas = {**({"ema": ema} if ema is not None else {}), **(emas or {})}
        for name, m in modules.items():
            self._write(name, {k: v.detach().cpu().contiguous() for k, v in m.state_dict().items()})
        for name, optimizer in optimizers.items():
            tensors, meta = _optimizer_tensors(optimizer)
            self._write(name, tensors)
            state = {**state, name: meta}
        for name, average in emas.items():
            self._write(name, {k: v.cpu().contiguous() for k, v in average.shadow.items()})
        tmp = self.folder / "state.json.tmp"
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self.state_path)

    def _write(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        tmp = self.folder / f"{name}.safetensors.tmp"
        save_file(tensors, str(tmp))
        os.replace(tmp, self.folder / f"{name}.safetensors")

    def load(self, modules: dict[str, torch.nn.Module], opt=None, ema: EMA | None = None, *,
             optimizers: dict[str, torch.optim.Optimizer] | None = None, emas: dict[str, EMA] | None = None) -> dict:
        """Load what `save` wrote (optimizers and EMAs whose files are there)."""
        state = self.state()
        optimizers = {**({"optimizer": opt} if opt is not None else {}), **(optimizers or {})}
        emas = {**({"ema": ema} if ema is not None else {}), **(emas or {})}
        for name, m in modules.items():
            m.load_state_dict(load_file(str(self.folder / f"{name}.safetensors")))
        for name, optimizer in optimizers.items():
            if (self.folder / f"{name}.safetensors").exists():
                _load_optimizer(optimizer, load_file(str(self.folder / f"{name}.safetensors")), state[name])
        for name, average in emas.items():
            if (self.folder / f"{name}.safetensors").exists():
                saved = load_file(str(self.folder / f"{name}.safetensors"))
                average.shadow = {k: v.to(average.shadow[k].device) for k, v in saved.items()}
        return state


class LossLog:
    """Appends one json line per logged step to `path`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.t0 = time.time()

    def write(self, **record) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


class StepBudget:
    """Fixes a stage's total step count so that it ends by `deadline` (unix time), if one is given.

    The count is measured after a few steps; afterwards it is re-checked every `recheck` steps and
    follows the machine both ways, up to `cap` (default: `total`): a busy stretch early in a run
    lowers it, and the steps come back once the machine is free again. The LR schedules read the
    count each step, so they stretch with it.
    """

    def __init__(self, total: int, deadline: float | None, locked: bool = False, measure_after: int = 8,
                 cost_factor: float = 1.0, recheck: int = 50, project=None, cap: int | None = None):
        self.cost_factor = cost_factor  # mean cost of a step / cost of the measured (first) steps
        # project(step, seconds_left, seconds_per_step) -> total: a run whose steps do not all cost
        # the same (train pair's two phases) says how many fit; the default assumes equal steps.
        self.project = project
        self.total = total
        self.cap = max(total, cap or total)
        self.deadline = deadline
        self.locked = locked or deadline is None
        self.measure_after = measure_after
        self.recheck = recheck
        self._t0: float | None = None
        self._s0 = 0

    def observe(self, step: int) -> None:
        if self.deadline is None:
            return
        now = time.time()
        if self._t0 is None:
            self._t0, self._s0 = now, step
            return
        window = self.recheck if self.locked else self.measure_after
        if step - self._s0 < window:
            return
        per_step = (now - self._t0) / (step - self._s0)
        left = max(0.0, self.deadline - now)
        if self.project is not None:
            projected = max(step + 1, int(self.project(step, left, per_step)))
        else:
            if not self.locked:
                per_step *= self.cost_factor
            projected = max(step + 1, step + int(left / per_step))
        self.total = min(self.cap, projected)
        self.locked = True
        self._t0, self._s0 = now, step


class StageLoop:
    """The bookkeeping every training stage's loop shares: the step against its budget, the
    progress bar, the loss log and the periodic checkpoint a resumed run continues from.

        loop = StageLoop(budget, state, bar, LossLog(path), ck, log_every=10, ckpt_every=100)
        while loop.running:
            ...one optimizer step...
            if loop.advance():
                loop.write_log({"loss": "0.123"}, loss=...)
            loop.checkpoint(modules, opt)
        loop.bar.close()
    """

    def __init__(self, budget: StepBudget, state: dict, bar, log: LossLog, ck: Checkpoint, *, log_every: int,
                 ckpt_every: int):
        self.budget, self.bar, self.log, self.ck = budget, bar, log, ck
        self.log_every, self.ckpt_every = log_every, ckpt_every
        self.step = state["step"]
        self.t_start = time.time() - state.get("wall_s", 0.0)  # a resumed run keeps counting its time

    @property
    def running(self) -> bool:
        return self.step < self.budget.total

    @property
    def wall_s(self) -> float:
        return time.time() - self.t_start

    @property
    def log_due(self) -> bool:
        return self.step % self.log_every == 0 or self.step == self.budget.total

    def advance(self) -> bool:
        """Count a finished step; True when it is one to log."""
        self.step += 1
        self.budget.observe(self.step)
        self.bar.total = self.budget.total
        self.bar.update(1)
        return self.log_due

    def write_log(self, postfix: dict[str, str], **record) -> None:
        self.log.write(step=self.step, **record, wall_s=self.wall_s)
        self.bar.set_postfix(**postfix)

    def checkpoint(self, modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer, ema: EMA | None = None,
                   **extra) -> None:
        """Save every `ckpt_every` steps, except the last (the stage's final save follows)."""
        if self.step % self.ckpt_every == 0 and self.step < self.budget.total:
            self.ck.save({"step": self.step, "total": self.budget.total, "locked": self.budget.locked,
                          "wall_s": self.wall_s, **extra}, modules, opt, ema)
