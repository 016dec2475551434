"""Device profiles: how measured seconds on this machine become user-visible seconds elsewhere.

Compute is *measured* here for each model (seconds per U-Net step, text encode, VAE decode).
A profile *models* the deployment: the cloud GPU runs `cloud_speedup` times faster than this
machine, the edge device is `edge_slowdown` times slower than that cloud GPU, and the network
has a round-trip time and a bandwidth per direction. So

    edge seconds  = measured edge compute / cloud_speedup * edge_slowdown
    cloud seconds = measured cloud compute / cloud_speedup + queue
    transfer      = RTT + bytes_up / up_bandwidth + bytes_down / down_bandwidth

The `measured` profile is the identity: everything on this machine, no network.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import InvalidInputError


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    cloud_speedup: float  # cloud GPU vs this machine, on the same model
    edge_slowdown: float  # edge device vs the cloud GPU, on the same model
    rtt_s: float
    up_bytes_per_s: float
    down_bytes_per_s: float
    source: str

    def edge_seconds(self, measured: float) -> float:
        return measured / self.cloud_speedup * self.edge_slowdown

    def cloud_seconds(self, measured: float) -> float:
        return measured / self.cloud_speedup

    def transfer_seconds(self, bytes_up: int, bytes_down: int) -> float:
        return self.rtt_s + bytes_up / self.up_bytes_per_s + bytes_down / self.down_bytes_per_s

    def as_dict(self) -> dict:
        return asdict(self)


MBIT = 1e6 / 8

PROFILES: dict[str, DeviceProfile] = {
    "measured": DeviceProfile(
        name="measured",
        cloud_speedup=1.0,
        edge_slowdown=1.0,
        rtt_s=0.0,
        up_bytes_per_s=float("inf"),
        down_bytes_per_s=float("inf"),
        source="no modelling: both models on this machine, no network",
    ),
    "laptop-gpu": DeviceProfile(
        name="laptop-gpu",
        cloud_speedup=50.0,
        edge_slowdown=4.0,
        rtt_s=0.030,
        up_bytes_per_s=20 * MBIT,
        down_bytes_per_s=100 * MBIT,
        source=(
            "edge: a laptop GPU (RTX 3060 Laptop class) runs SD v1.5 U-Net steps ~4x slower than a "
            "datacenter A100 (public diffusers benchmarks: ~0.1 s vs ~0.025 s per 512x512 step); "
            "cloud: a datacenter GPU ~50x a 2-core CPU on these U-Nets (rough; see "
            "benchmarks/unet_latency.py for this machine's numbers); broadband 20/100 Mbit/s, 30 ms RTT"
        ),
    ),
    "phone-4g": DeviceProfile(
        name="phone-4g",
        cloud_speedup=50.0,
        edge_slowdown=15.0,
        rtt_s=0.060,
        up_bytes_per_s=5 * MBIT,
        down_bytes_per_s=20 * MBIT,
        source=(
            "edge: a flagship phone NPU (Snapdragon 8 Gen 2 class, SD v1.5 20 steps in ~12-15 s in "
            "vendor demos) ~15x slower than an A100 (~1 s); cloud as laptop-gpu; 4G 5/20 Mbit/s, 60 ms RTT"
        ),
    ),
}


def get_profile(name: str) -> DeviceProfile:
    if name not in PROFILES:
        raise InvalidInputError(f"unknown device profile {name!r}; choose one of {', '.join(PROFILES)}")
    return PROFILES[name]
