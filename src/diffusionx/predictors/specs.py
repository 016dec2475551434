"""Policy specs for `diffusionx bench --policy`: the predictors' policies by name.

learned[-eps0.02][-eeps0.02][-ceps0.01][-cw0.05][-ecw0]   LearnedPolicy (eps: both directions;
                                                          default edge eps: the tuned one)
       [-emin0.4][-cmin1]                                 strength floors (default: the tuned ones)
load-aware[-wait10][-ww0.01][-floor0.05][-eps..]          LoadAwarePolicy; wait = the estimated
                                                          wait (s) of an in-process load report
similarity-rule[-low0.5][-min0.3][-c0.5]                  SimilarityRule baseline
oracle[-eps0.02][-eeps..][-ceps..]                        OraclePolicy: per-case labels of a sweep
                                                          ($DIFFUSIONX_ORACLE_SWEEPS, or bench --oracle-sweeps)
"""

from __future__ import annotations

import re
from typing import Any

PREFIXES = ("learned", "load-aware", "similarity-rule", "oracle")
_PARAM = re.compile(r"^([a-z]+)([0-9.]+)$")
_KEYS = {
    "learned": {"eps", "eeps", "ceps", "cw", "ecw", "emin", "cmin"},
    "load-aware": {"eps", "eeps", "ceps", "cw", "ecw", "emin", "cmin", "wait", "ww", "floor"},
    "similarity-rule": {"low", "min", "c"},
    "oracle": {"eps", "eeps", "ceps"},
}


def is_predictor_spec(spec: str) -> bool:
    return any(spec == p or spec.startswith(p + "-") for p in PREFIXES)


def policy_from_spec(spec: str, oracle_sweeps: list[str] | None = None) -> Any:
    """The policy a spec names; ValueError for a malformed one."""
    prefix = next(p for p in PREFIXES if spec == p or spec.startswith(p + "-"))
    params: dict[str, float] = {}
    for token in filter(None, spec[len(prefix) :].split("-")):
        m = _PARAM.match(token)
        if not m or m.group(1) not in _KEYS[prefix]:
            raise ValueError(f"bad parameter {token!r} in {spec!r}; {prefix} takes {', '.join(sorted(_KEYS[prefix]))}")
        params[m.group(1)] = float(m.group(2))
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
