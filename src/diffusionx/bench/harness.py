"""The paper's comparison: cloud-only vs edge-only vs DiffusionX on multi-round sessions.

Quality comes from real generations with the pair's models (batched across sessions for
throughput; a batched result equals its unbatched one, see tests/test_engine.py). Latency is
built from per-model compute times *measured* on this machine at batch 1 (`calibrate`) and the
step counts each method runs, mapped to a deployment by a `DeviceProfile` (modelled).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..engine import Engine
from ..errors import InvalidInputError
from ..models import ModelPair
from ..policies import FixedStrength, StrengthPolicy
from ..wire import image_to_png
from .profiles import DeviceProfile


@dataclass
class Method:
    name: str
    kind: str  # "cloud-only" | "edge-only" | "diffusionx"
    policy: StrengthPolicy | None = None
    reuse_latents: bool = True  # diffusionx only: False = every round fresh on the edge

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        if self.policy is not None:
            out["policy"] = type(self.policy).__name__
            if isinstance(self.policy, FixedStrength):
                out["edge_strength"], out["cloud_strength"] = self.policy.edge, self.policy.cloud
            out["reuse_latents"] = self.reuse_latents
        return out


def default_methods(cloud_strengths: list[float], edge_strength: float = 0.6) -> list[Method]:
    methods = [Method("cloud-only", "cloud-only"), Method("edge-only", "edge-only")]
    for s in cloud_strengths:
        policy = FixedStrength(edge=edge_strength, cloud=s)
        methods.append(Method(f"diffusionx-fixed-{s:g}", "diffusionx", policy))
    if cloud_strengths:
        policy = FixedStrength(edge=1.0, cloud=cloud_strengths[0])
        methods.append(Method(f"diffusionx-noreuse-{cloud_strengths[0]:g}", "diffusionx", policy, reuse_latents=False))
    return methods


# ----- measured compute ------------------------------------------------------------------------
def sync(device: torch.device | None) -> None:
    """Wait for `device`'s queued work: CUDA is asynchronous, and a timer must see finished work."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device | None = None) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


CALIBRATED = ("unet_step_s", "text_encode_s", "decode_s", "vae_encode_s")
PREVIEW_DECODE = "preview_decode_s"  # the edge's tiny preview decoder, where the pair has one


def calibrate(pair: ModelPair, repeats: int = 15, guidance_scale: float = 7.5) -> dict[str, Any]:
    """Seconds per U-Net step (batch 1, with CFG: what one user's session costs), per text encode
    and per VAE decode/encode, for the edge and the cloud model (and per preview decode by the
    edge's tiny decoder, where it has one).

    Timed interleaved: each repeat times every operation of the edge, then of the cloud, so that a
    machine getting busier or quieter during the calibration shifts both models alike. Each time is
    the fastest repeat (other work on the machine only ever adds time, so the fastest is the one
    closest to the model's own cost; the latency model maps it to a deployment), `median` the
    medians, `noise` each operation's spread (interquartile range / median): how loaded the
    machine was. `edge_to_cloud_step` is the median per-repeat ratio of the two U-Net step times."""
    ops: dict[str, dict[str, Any]] = {}
    for role, engine in (("edge", pair.edge), ("cloud", pair.cloud)):
        emb = engine.encode_prompt("a large red circle on the left on a blue background")
        latents = torch.randn(engine.latent_shape(), generator=torch.Generator().manual_seed(0))
        latents = latents.to(engine.device, engine.dtype)
        image = engine.decode(latents)[0]

        def one_step(engine=engine, emb=emb, latents=latents):
            job = engine.start(emb, seed=0, steps=1, guidance_scale=guidance_scale)
            job.latents = latents
            engine.step([job])

        def encode_text(engine=engine):  # prompt + negative prompt, uncached on purpose
            engine._encode_text("a small blue star at the top right")
            engine._encode_text("")

        ops[role] = {
            "unet_step_s": one_step,
            "text_encode_s": encode_text,
            "decode_s": lambda engine=engine, latents=latents: engine.decode(latents),
            "vae_encode_s": lambda engine=engine, image=image: engine.encode_image(image),
        }
        if engine.preview_vae is not None:
            ops[role][PREVIEW_DECODE] = lambda engine=engine, latents=latents: engine.decode(latents, preview=True)
        for fn in ops[role].values():
            fn()  # warm-up
    samples: dict[str, dict[str, list[float]]] = {role: {op: [] for op in ops[role]} for role in ops}
    for _ in range(repeats):
        for role, engine in (("edge", pair.edge), ("cloud", pair.cloud)):
            for op in ops[role]:
                samples[role][op].append(_timed(ops[role][op], engine.device))
    out: dict[str, Any] = {role: {op: min(v) for op, v in samples[role].items()} for role in samples}
    out["median"] = {role: {op: statistics.median(v) for op, v in samples[role].items()} for role in samples}
    out["noise"] = {role: {op: _spread(v) for op, v in samples[role].items()} for role in samples}
    ratios = [e / c for e, c in zip(samples["edge"]["unet_step_s"], samples["cloud"]["unet_step_s"])]
    out["edge_to_cloud_step"] = statistics.median(ratios)
    out["repeats"] = repeats
    return out


def _spread(values: list[float]) -> float:
    q1, q3 = np.percentile(values, [25, 75])
    median = statistics.median(values)
    return float((q3 - q1) / median) if median else 0.0


# ----- batched generation ----------------------------------------------------------------------
@dataclass
class Item:
    prompt: str
    seed: int
    strength: float = 1.0
    init_latents: torch.Tensor | None = None


def generate_batched(
    engine: Engine, items: list[Item], *, steps: int, guidance_scale: float, batch: int, desc: str
) -> list[torch.Tensor]:
    """Latents for each item, `batch` jobs sharing each U-Net call."""
    results: list[torch.Tensor] = []
    with tqdm(total=len(items), desc=desc, leave=False) as bar:
        for start in range(0, len(items), batch):
            chunk = items[start : start + batch]
            jobs = [
                engine.start(
                    engine.encode_prompt(item.prompt, guidance=guidance_scale > 1.0),
                    seed=item.seed,
                    steps=steps,
                    strength=item.strength,
                    init_latents=item.init_latents,
                    guidance_scale=guidance_scale,
                )
                for item in chunk
            ]
            engine.run(jobs)
            results.extend(job.latents for job in jobs)
            bar.update(len(chunk))
    return results


def decode_batched(engine: Engine, latents: list[torch.Tensor], batch: int = 64) -> list:
    images = []
    for start in range(0, len(latents), batch):
        images.extend(engine.decode(torch.cat(latents[start : start + batch])))
    return images


def generated_attribute_accuracy(
    engine: Engine, prompts: list[str], *, steps: int, seed: int = 0, guidance_scale: float = 7.5, batch: int = 64,
    desc: str = "generate",
) -> dict[str, Any]:
    """The evaluator's attribute accuracy ("mean", "per_attribute", ...) of `engine`'s fresh
    generations of `prompts`, prompt i from seed `seed + i`, `batch` jobs sharing each U-Net call."""
    from ..metrics import get_evaluator

    items = [Item(prompt, seed + i) for i, prompt in enumerate(prompts)]
    latents = generate_batched(engine, items, steps=steps, guidance_scale=guidance_scale, batch=batch, desc=desc)
    return get_evaluator().attribute_accuracy(decode_batched(engine, latents, batch), prompts)


# ----- one method over all sessions ------------------------------------------------------------
@dataclass
class SessionRecord:
    rounds: list[dict[str, Any]] = field(default_factory=list)  # per round: steps, strength
    final: dict[str, Any] = field(default_factory=dict)
    final_image: Any = None
    previews: list[Any] = field(default_factory=list)  # (round index, image) pairs


def run_method(
    method: Method,
    pair: ModelPair,
    sessions: list[dict],
    *,
    steps: int,
    guidance_scale: float,
    batch: int,
    seed: int,
) -> list[SessionRecord]:
    records = [SessionRecord() for _ in sessions]
    seeds = [seed + i for i in range(len(sessions))]
    if method.kind in ("cloud-only", "edge-only"):
        # Every round is a fresh generation, independent of the others: only the final is
        # generated (intermediate rounds are the same kind of generation; their cost is counted).
        engine = pair.cloud if method.kind == "cloud-only" else pair.edge
        items = [Item(s["rounds"][-1]["prompt"], sd) for s, sd in zip(sessions, seeds)]
        latents = generate_batched(
            engine, items, steps=steps, guidance_scale=guidance_scale, batch=batch, desc=method.name
        )
        images = decode_batched(engine, latents)
        # An edge-only user also sees the rounds before the last through the preview decoder.
        previews = engine.uses_preview_decoder(method.kind == "edge-only")
        for record, session, image in zip(records, sessions, images):
            last = len(session["rounds"]) - 1
            record.rounds = [{"strength": 1.0, "unet_steps": steps, "preview_decoded": previews and k < last}
                             for k in range(last + 1)]
            record.final_image = image
            record.previews = [(len(session["rounds"]), image)]
            if method.kind == "cloud-only":
                png = len(image_to_png(image))
                for r, round_ in zip(record.rounds, session["rounds"]):
                    r["bytes_up"], r["bytes_down"] = len(round_["prompt"].encode()), png
        return records

    # DiffusionX: real EdgeSessions, the product's own protocol, advanced in lock-step (one
    # batched U-Net call per step across sessions); finals refined through the in-process cloud
    # refiner with the fp16 wire format both ways.
    from ..cloud import CloudRefiner
    from ..session import EdgeSession, advance, finalize_all

    policy = method.policy or FixedStrength()
    refiner = CloudRefiner(pair.cloud)
    live = [EdgeSession(pair, policy=policy, cloud=refiner, steps=steps, guidance_scale=guidance_scale, seed=sd)
            for sd in seeds]
    n_rounds = max(len(s["rounds"]) for s in sessions)
    for r in range(n_rounds):
        active = [i for i, s in enumerate(sessions) if r < len(s["rounds"])]
        prompts = [sessions[i]["rounds"][r]["prompt"] for i in active]
        strengths = None if method.reuse_latents else [1.0] * len(active)
        rounds = advance([live[i] for i in active], prompts, strengths=strengths, batch=batch)
        for i, round_ in zip(active, rounds):
            records[i].rounds.append({"strength": round_.strength, "unet_steps": round_.unet_steps,
                                      "preview_decoded": round_.preview_decoded})
            records[i].previews.append((r + 1, round_.image))
    finals = finalize_all(live, refiner, batch=batch)
    for record, final in zip(records, finals):
        record.final = {"strength": final.strength, "unet_steps": final.unet_steps, "bytes_up": final.bytes_up,
                        "bytes_down": final.bytes_down}
        record.final_image = final.image
    return records


# ----- latency model ---------------------------------------------------------------------------
def session_latency(
    method: Method, record: SessionRecord, calib: dict[str, dict[str, float]], profile: DeviceProfile
) -> dict[str, Any]:
    """User-visible seconds per round and per session, and what the cloud and the wire carried."""
    edge, cloud = calib["edge"], calib["cloud"]
    waits, cloud_unet_measured, bytes_total = [], 0.0, 0
    for r in record.rounds:
        if method.kind == "cloud-only":
            compute = cloud["text_encode_s"] + r["unet_steps"] * cloud["unet_step_s"] + cloud["decode_s"]
            cloud_unet_measured += r["unet_steps"] * cloud["unet_step_s"]
            bytes_total += r["bytes_up"] + r["bytes_down"]
            waits.append(profile.cloud_seconds(compute) + profile.transfer_seconds(r["bytes_up"], r["bytes_down"]))
        else:
            compute = edge["text_encode_s"] + r["unet_steps"] * edge["unet_step_s"] + _edge_decode_s(edge, r)
            waits.append(profile.edge_seconds(compute))
    final_wait = 0.0
    if method.kind == "diffusionx":
        f = record.final
        cloud_compute = cloud["text_encode_s"] + f["unet_steps"] * cloud["unet_step_s"]
        cloud_unet_measured += f["unet_steps"] * cloud["unet_step_s"]
        bytes_total += f["bytes_up"] + f["bytes_down"]
        final_wait = (
            profile.transfer_seconds(f["bytes_up"], f["bytes_down"])
            + profile.cloud_seconds(cloud_compute)
            + profile.edge_seconds(edge["decode_s"])
        )
    return {
        "round_waits_s": waits,
        "final_wait_s": final_wait,
        "session_s": sum(waits) + final_wait,
        "cloud_unet_measured_s": cloud_unet_measured,
        "cloud_unet_modelled_s": profile.cloud_seconds(cloud_unet_measured),
        "bytes": bytes_total,
    }


def _edge_decode_s(edge: dict[str, float], round_: dict[str, Any]) -> float:
    if not round_.get("preview_decoded"):
        return edge["decode_s"]
    if PREVIEW_DECODE not in edge:
        raise InvalidInputError(
            "the calibration has no time for the edge's preview decoder (it predates it): measure one with "
            "`diffusionx bench --calibrate-only`, or run with --preview-decoder none")
    return edge[PREVIEW_DECODE]


def p95(values: list[float]) -> float:
    return float(np.percentile(values, 95)) if values else float("nan")
