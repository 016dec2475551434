"""The one registry of strength policies by spec, for every command, the web UI and the benchmark.

fixed[-C] | fixed-E-C                                      FixedStrength: edge E (default: the
                                                          caller's, e.g. --edge-strength), cloud C
learned[-eps0.02][-eeps0.02][-ceps0.01][-cw0.05][-ecw0]   LearnedPolicy (eps: both directions;
       [-emin0.4][-cmin1]                                 default edge eps and floors: the tuned ones)
load-aware[-wait10][-ww0.01][-floor0.05][-eps..]          LoadAwarePolicy; wait = the estimated
                                                          wait (s) of an in-process load report
similarity-rule[-low0.5][-min0.3][-c0.5]                  SimilarityRule baseline
oracle[-eps0.02][-eeps..][-ceps..]                        OraclePolicy: per-case labels of a sweep
                                                          ($DIFFUSIONX_ORACLE_SWEEPS, or bench --oracle-sweeps)

Torch-free until a policy is built: `check_spec` validates a spec while the command line is
parsed, `policy_from_spec` builds it.
"""

from __future__ import annotations

import re
from typing import Any

PREFIXES = ("fixed", "learned", "load-aware", "similarity-rule", "oracle")
PREDICTOR_PREFIXES = PREFIXES[1:]
SPEC_HELP = ("fixed[-C] or fixed-E-C (strengths), learned, load-aware[-waitS], similarity-rule, oracle "
             "(parameters: docs/predictors.md)")
# What the web page offers; any spec works through the API and the command line.
CHOICES = ("fixed", "learned", "load-aware", "similarity-rule")
_PARAM = re.compile(r"^([a-z]+)([0-9.]+)$")
_KEYS = {
    "learned": {"eps", "eeps", "ceps", "cw", "ecw", "emin", "cmin"},
    "load-aware": {"eps", "eeps", "ceps", "cw", "ecw", "emin", "cmin", "wait", "ww", "floor"},
    "similarity-rule": {"low", "min", "c"},
    "oracle": {"eps", "eeps", "ceps"},
}


def _prefix(spec: str) -> str | None:
    return next((p for p in PREFIXES if spec == p or spec.startswith(p + "-")), None)


def is_predictor_spec(spec: str) -> bool:
    return _prefix(spec) in PREDICTOR_PREFIXES


def _parse(spec: Any) -> tuple[str, Any]:
    """(prefix, parameters): fixed -> (edge or None, cloud or None); others -> {key: value}."""
    prefix = _prefix(spec) if isinstance(spec, str) else None
    if prefix is None:
        raise ValueError(f"unknown policy {spec!r}: use {SPEC_HELP}")
    rest = [token for token in spec[len(prefix):].split("-") if token]
    if prefix == "fixed":
        try:
            values = [float(token) for token in rest]
        except ValueError:
            raise ValueError(f"policy {spec!r}: fixed takes strengths, as fixed-0.5 or fixed-0.6-0.5") from None
        if len(values) > 2 or any(not 0.0 <= v <= 1.0 for v in values):
            raise ValueError(f"policy {spec!r}: fixed-C or fixed-E-C with strengths in [0, 1]")
        padded = [None] * (2 - len(values)) + values  # fixed-C names the cloud's strength only
        return prefix, (padded[0], padded[1])
    params: dict[str, float] = {}
    for token in rest:
        m = _PARAM.match(token)
        if not m or m.group(1) not in _KEYS[prefix]:
            raise ValueError(f"bad parameter {token!r} in {spec!r}; {prefix} takes {', '.join(sorted(_KEYS[prefix]))}")
        params[m.group(1)] = float(m.group(2))
    return prefix, params


def check_spec(spec: str) -> str:
    """`spec` when it is well formed (ValueError otherwise); builds nothing."""
    _parse(spec)
    return spec


def policy_from_spec(spec: str, *, edge_strength: float = 0.6, cloud_strength: float = 0.5,
                     oracle_sweeps: list[str] | None = None) -> Any:
    """The policy a spec names; ValueError for a malformed one. `edge_strength` / `cloud_strength`
    fill what a fixed spec leaves out."""
    prefix, params = _parse(spec)
    if prefix == "fixed":
        from ..policies import FixedStrength

        edge, cloud = params
        return FixedStrength(edge=edge_strength if edge is None else edge,
                             cloud=cloud_strength if cloud is None else cloud)
    from .curves import DEFAULT_EPS
    from .policies import LearnedPolicy, LoadAwarePolicy, OraclePolicy, SimilarityRule

    if prefix == "similarity-rule":
        return SimilarityRule(
            low=params.get("low", 0.5), min_strength=params.get("min", 0.3), cloud=params.get("c", 0.5)
        )
    eps = params.get("eps", DEFAULT_EPS)
    edge_eps, cloud_eps = params.get("eeps", eps), params.get("ceps", eps)
    if prefix == "oracle":
        return OraclePolicy(oracle_sweeps, edge_eps=edge_eps, cloud_eps=cloud_eps)
    kwargs: dict[str, Any] = {
        "edge_eps": params.get("eeps", params.get("eps")),  # None: the eps `predictors tune` chose
        "cloud_eps": cloud_eps,
        "cloud_cost": params.get("cw", 0.0),
        "edge_cost": params.get("ecw", 0.0),
        "min_edge": params.get("emin"),  # None: the floors `predictors tune` chose (manifest)
        "min_cloud": params.get("cmin"),
    }
    if prefix == "learned":
        return LearnedPolicy(**kwargs)
    wait = params.get("wait", 0.0)
    return LoadAwarePolicy(
        wait_weight=params.get("ww", 0.01),
        max_drop=params.get("floor", 0.05),
        load_source=lambda: {"estimated_wait_s": wait},
        **kwargs,
    )


def policy_label(spec: str, policy: Any) -> str:
    """The benchmark's method name for a spec: fixed ones spell out the strengths they use."""
    if _prefix(spec) == "fixed":
        short = _parse(spec)[1][0] is None
        return f"diffusionx-fixed-{policy.cloud:g}" if short else f"diffusionx-fixed-{policy.edge:g}-{policy.cloud:g}"
    return f"diffusionx-{spec}"
