"""The refinement service as a Ray Serve deployment: same HTTP API, N replicas, optional autoscaling.

Each replica loads the cloud model once and runs the *same* FastAPI app (`create_app`) with the
same continuous step-level batcher inside; Ray Serve's HTTP proxy spreads requests over replicas.
Why not `@serve.batch`: it gathers whole requests into a batch and returns when the whole batch is
done, so a 2-step refinement that arrives next to a 20-step one waits for all 20, and nobody joins
a batch that has started. The step-level batcher admits and releases requests at every U-Net step.
(docs/serving.md says more, and how to run it on a KubeRay cluster.)

Quotas are per replica, as with several plain servers behind a load balancer (Ray's proxy does
not pin a client to one replica). The idempotency store is shared when `store` is: a SQLite file
for replicas on one machine, `redis://...` across machines; "memory" gives each replica its own.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from typing import Any

from .config import Limits

DEPLOYMENT_NAME = "diffusionx-refiner"
APP_NAME = "diffusionx"


def ray_environment() -> None:
    """Settings Ray needs here, set before `import ray` (they are read at import/init time)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def autoscaling_config(replicas: int, max_replicas: int, max_batch: int, *, upscale_delay_s: float = 10.0,
                       downscale_delay_s: float = 120.0, look_back_period_s: float = 10.0) -> dict[str, Any] | None:
    """Scale on requests in flight per replica: a replica is 'full' at one batch's worth. Ray adds a
    replica once the mean in flight over `look_back_period_s` stays above that for
    `upscale_delay_s`, and removes one after `downscale_delay_s` below it."""
    if max_replicas <= replicas:
        return None
    return {
        "min_replicas": replicas,
        "max_replicas": max_replicas,
        "target_ongoing_requests": max_batch,
        "upscale_delay_s": upscale_delay_s,
        "downscale_delay_s": downscale_delay_s,
        "look_back_period_s": look_back_period_s,
    }


def build_app(
    *,
    model: str = "embedded",
    cloud: str | None = None,
    tokens: set[str] | None = None,
    insecure: bool = False,
    max_batch: int = 8,
    limits: Limits | None = None,
    replicas: int = 1,
    max_replicas: int = 0,
    threads: int = 1,
    cpus_per_replica: float = 1.0,
    gpus_per_replica: float = 0.0,
    device: str = "auto",
    store: str = "memory",
    scaling_delays: dict[str, float] | None = None,
):
    """A bound Ray Serve application; pass it to `serve.run`. `store`: the idempotency store every
    replica opens (what `open_store` takes)."""
    ray_environment()
    from ray import serve

    class RefinerReplica:
        def __init__(self, model, cloud, tokens, insecure, max_batch, limits, threads, device, store):
            import torch

            if threads:
                torch.set_num_threads(threads)
            from diffusionx.models import load_pair
            from diffusionx.server.app import create_app
            from diffusionx.server.config import resolve_device

            # the replica refines finals: it never decodes an edge preview
            pair = load_pair(model, cloud=cloud, device=resolve_device(device), preview_decoder=None)
            self._app = create_app(
                pair.cloud,
                tokens=tokens,
                insecure=insecure,
                max_batch=max_batch,
                limits=limits,
                replica=_replica_name(),
                store=store,
            )

        def __serve_build_asgi_app__(self):
            return self._app

        def check_health(self):
            """Ray restarts a replica whose batching worker died."""
            refiner = self._app.state.service.refiner
            if not getattr(refiner, "alive", True) and not self._app.state.service.draining:
                raise RuntimeError(f"the batching worker stopped: {getattr(refiner, 'crashed', None)!r}")

    scaling = autoscaling_config(replicas, max_replicas, max_batch, **(scaling_delays or {}))
    options: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "ray_actor_options": {"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
        # Above the batch size, so a replica holds a full batch plus a queue to admit from at the
        # next step boundary; beyond this, requests wait at the proxy for a free replica.
        "max_ongoing_requests": max(4 * max_batch, 16),
        "graceful_shutdown_timeout_s": (limits or Limits()).drain_timeout_s,
        "health_check_period_s": 10,
    }
    if scaling:
        options["autoscaling_config"] = scaling
    else:
        options["num_replicas"] = replicas
    deployment = serve.deployment(serve.ingress()(RefinerReplica), **options)
    limits = limits or Limits()
    return deployment.bind(model, cloud, set(tokens or ()), insecure, max_batch, limits, threads, device, store)


def app_from_env(args: dict[str, Any] | None = None):
    """Application builder for Ray Serve config files / KubeRay (`import_path:
    diffusionx.server.ray_serve:app_from_env`): settings from the config's `args` or from
    DIFFUSIONX_MODEL, DIFFUSIONX_MAX_BATCH, DIFFUSIONX_TOKENS, DIFFUSIONX_INSECURE, DIFFUSIONX_STORE
    (the idempotency store: redis://host:port/db to share it between pods; default memory, one per
    replica). Replica counts and autoscaling come from the config's `deployments:` section."""
    from .app import load_tokens

    args = dict(args or {})

    def setting(name: str, default: str) -> str:
        return str(args.get(name, os.environ.get(f"DIFFUSIONX_{name.upper()}", default)))

    tokens = load_tokens(args.get("tokens_file"))
    insecure = setting("insecure", "0").lower() in ("1", "true", "yes")
    if not tokens and not insecure:
        raise ValueError("no API tokens: set DIFFUSIONX_TOKENS (or args.tokens_file), or insecure: true")
    return build_app(
        model=setting("model", "embedded"),
        tokens=tokens,
        insecure=insecure,
        max_batch=int(setting("max_batch", "8")),
        threads=int(setting("threads", "0")),
        device=setting("device", "auto"),
        gpus_per_replica=float(setting("gpus_per_replica", "0")),
        store=setting("store", "memory"),
    )


def _replica_name() -> str:
    try:
        from ray import serve

        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:
        return f"{socket.gethostname()}:{os.getpid()}"


def run_ray(args, *, tokens: set[str], limits: Limits, store: str = "memory") -> int:
    """`diffusionx serve --ray`: start (or join) Ray, deploy, serve until interrupted."""
    ray_environment()
    try:
        import ray
        from ray import serve
    except ImportError:
        print("error: --ray needs Ray Serve: pip install 'diffusionx[serve]' (or 'ray[serve]')", file=sys.stderr)
        return 2
    if args.replicas < 1:
        print(f"error: --replicas must be >= 1, got {args.replicas}", file=sys.stderr)
        return 2
    if args.ray_address:
        ray.init(address=args.ray_address)
    else:
        ray.init(include_dashboard=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    app = build_app(
        model=args.model,
        cloud=args.cloud,
        tokens=tokens,
        insecure=args.insecure,
        max_batch=args.max_batch,
        limits=limits,
        replicas=args.replicas,
        max_replicas=args.max_replicas,
        threads=args.threads or 1,
        device=args.device,
        gpus_per_replica=1.0 if args.device == "cuda" else 0.0,
        store=store,
    )
    print(f"Ray Serve: {args.replicas} replica(s) on http://{args.host}:{args.port}", file=sys.stderr)

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # SIGTERM (e.g. from Kubernetes) shuts down like Ctrl-C
    try:
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
