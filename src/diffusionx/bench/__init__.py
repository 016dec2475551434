"""The paper's comparison harness: cloud-only vs edge-only vs DiffusionX."""

from .harness import Method, calibrate, default_methods, run_method, session_latency
from .profiles import PROFILES, DeviceProfile, get_profile
from .run import latency_under, load_sessions, parse_policy, read_calibration, run_bench, write_calibration

__all__ = [
    "PROFILES",
    "DeviceProfile",
    "Method",
    "calibrate",
    "default_methods",
    "get_profile",
    "latency_under",
    "load_sessions",
    "parse_policy",
    "read_calibration",
    "run_bench",
    "run_method",
    "session_latency",
    "write_calibration",
]
