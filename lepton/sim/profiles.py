"""Device profiles for simulated fleets.

Figures are effective throughput of small CNN inference/training kernels with the runtime each
board would use (ONNX Runtime on the CPU for the Raspberry Pis and the x86 gateway, TensorRT on
the Jetson's GPU), scaled from public specifications and benchmarks:

- Raspberry Pi 4 Model B: 4x Cortex-A72 @ 1.5 GHz, 4 GB; NEON fp32 peak ~24 GFLOP/s, small-CNN
  inference sustains roughly a quarter of that; INT8 (QDQ, ARM dot-product absent) ~2x fp32.
- Raspberry Pi 5: 4x Cortex-A76 @ 2.4 GHz, 8 GB; 2-3x a Pi 4 on CPU inference; the A76 has
  the dot-product instructions, so INT8 gains more (~2.2x fp32).
- Jetson Orin Nano 8 GB: 6x Cortex-A78AE + 1024-core Ampere GPU, 40 INT8 TOPS (sparse) / ~20
  dense; fp16/fp32 on the GPU through TensorRT.
- x86 gateway (Intel N100 class): 4 cores AVX2, 16 GB; VNNI-less INT8 ~2x fp32.

Battery and thermal settings describe typical deployments (a Pi on a UPS HAT, a fanless
enclosure), not the boards themselves.

Simulated devices advertise the ``torch`` runtime when torch is installed on the host: their
``train`` tasks run for real on the host, so they can take part in federated jobs.
"""

from __future__ import annotations

import importlib.util
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


def host_training_runtimes() -> tuple[str, ...]:
    """``("torch",)`` when torch is installed here (found without importing it), else ``()``."""
    return ("torch",) if importlib.util.find_spec("torch") is not None else ()


TRAINING_RUNTIMES = host_training_runtimes()


@dataclass(frozen=True, slots=True, kw_only=True)
class Profile:
    """What a class of device looks like to the scheduler, and how fast it really works."""

    name: str
    device_model: str
    cores: int
    memory_bytes: int
    fp32_gflops: float
    int8_gops: float
    accelerators: tuple[str, ...] = ("cpu",)
    runtimes: tuple[str, ...] = ("onnxruntime", *TRAINING_RUNTIMES)
    slots: int = 1
    battery: bool = False
    # Battery drain in percent per minute, idle and busy.
    drain_idle: float = 0.05
    drain_busy: float = 0.5
    # Degrees C above ambient at full load; throttles at 80 C and then runs at half speed.
    heat_rise_c: float = 20.0
    bandwidth_bps: float = 20e6


GiB = 1 << 30

PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile(
            name="rpi4",
            device_model="Raspberry Pi 4 Model B Rev 1.4",
            cores=4,
            memory_bytes=4 * GiB,
            fp32_gflops=6.0,
            int8_gops=12.0,
            battery=True,
            heat_rise_c=45.0,
            bandwidth_bps=10e6,
        ),
        Profile(
            name="rpi5",
            device_model="Raspberry Pi 5 Model B Rev 1.0",
            cores=4,
            memory_bytes=8 * GiB,
            fp32_gflops=16.0,
            int8_gops=36.0,
            heat_rise_c=35.0,
            bandwidth_bps=20e6,
        ),
        Profile(
            name="jetson-orin-nano",
            device_model="NVIDIA Jetson Orin Nano Developer Kit",
            cores=6,
            memory_bytes=8 * GiB,
            fp32_gflops=400.0,
            int8_gops=1200.0,
            accelerators=("cpu", "cuda", "tensorrt"),
            slots=2,
            heat_rise_c=25.0,
            bandwidth_bps=50e6,
        ),
        Profile(
            name="x86-gateway",
            device_model="Intel N100 gateway",
            cores=4,
            memory_bytes=16 * GiB,
            fp32_gflops=60.0,
            int8_gops=120.0,
            slots=2,
            heat_rise_c=15.0,
            bandwidth_bps=100e6,
        ),
    )
}

DEFAULT_MIX: dict[str, float] = {
    "rpi4": 0.4,
    "rpi5": 0.3,
    "jetson-orin-nano": 0.1,
    "x86-gateway": 0.2,
}


def parse_mix(text: str) -> dict[str, float]:
    """``"rpi4=0.5,rpi5=0.5"`` -> weights; unknown profile names are an error."""
    mix: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, weight = part.partition("=")
        if name not in PROFILES:
            raise ValueError(f"unknown profile {name!r}; known: {', '.join(PROFILES)}")
        try:
            mix[name] = float(weight) if weight else 1.0
        except ValueError as exc:
            raise ValueError(f"bad weight in {part!r}") from exc
        if mix[name] < 0:
            raise ValueError(f"negative weight in {part!r}")
    if not mix or sum(mix.values()) <= 0:
        raise ValueError("the profile mix is empty")
    return mix


def assign_profiles(n: int, mix: Mapping[str, float], seed: int = 0) -> list[Profile]:
    """``n`` profiles in the proportions of ``mix`` (largest remainder), shuffled with ``seed``."""
    total = sum(mix.values())
    exact = {name: n * w / total for name, w in mix.items()}
    counts = {name: int(v) for name, v in exact.items()}
    order: Sequence[str] = sorted(exact, key=lambda k: exact[k] - counts[k], reverse=True)
    for name in order[: n - sum(counts.values())]:
        counts[name] += 1
    out = [PROFILES[name] for name, c in counts.items() for _ in range(c)]
    random.Random(seed).shuffle(out)
    return out
