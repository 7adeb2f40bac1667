"""Bounds on what a device may claim about its own speed.

A device's start-up benchmark (``bench.fp32_gflops``, ``bench.int8_gops``) is self-reported:
a device that overstates it would pull work to itself until its finished tasks say otherwise.
Before the estimator believes a claim it is held to two limits (Finding 12 of the hardening
review):

* the plausible maximum of the device's class (:data:`DEFAULT_FP32_GFLOPS`,
  :data:`DEFAULT_INT8_GOPS`; a class not in the table gets the fallback maximum), well above
  what the agent's micro-benchmark measures on such hardware;
* the lower median of the claims of the devices of the same class the estimator knows: a
  claim above what its peers report is not believed until the device's own finished tasks
  support it (an honest fast device pays for that with a few tasks; a lying one does not
  gain a larger share of a batch than its peers).

Figures are whole-device effective throughput (GFLOP/s for fp32, GOP/s for int8), not per
lane. Defaults come from public peak figures, rounded up: Raspberry Pi 4 ~24 GFLOP/s NEON
fp32 peak, Pi 5 ~2.5x that with dot-product int8, Jetson Orin Nano 1.28 TFLOP/s fp32 / 40
sparse int8 TOPS, Orin NX 100 TOPS, AGX Orin 5.3 TFLOP/s / 275 TOPS, a many-core AVX-512 x86
host ~4 TFLOP/s fp32. An operator with faster hardware raises its class in the cost weights
(``max_fp32_gflops_by_class``, ``max_int8_gops_by_class``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, Literal

# Plausible maxima per device class (labels as agent.board.device_class_for and the simulator
# profiles name them).
DEFAULT_FP32_GFLOPS: Final[Mapping[str, float]] = MappingProxyType(
    {
        "rpi-zero": 2.0,
        "rpi-zero2": 10.0,
        "rpi3": 10.0,
        "rpi4": 30.0,
        "rpi5": 80.0,
        "rpi": 80.0,
        "jetson-nano": 300.0,
        "jetson-tx2": 700.0,
        "jetson-xavier-nx": 1_000.0,
        "jetson-agx-xavier": 1_500.0,
        "jetson-xavier": 1_500.0,
        "jetson-orin-nano": 1_500.0,
        "jetson-orin-nx": 2_000.0,
        "jetson-agx-orin": 6_000.0,
        "jetson-orin": 6_000.0,
        "jetson": 6_000.0,
        "aarch64": 500.0,
        "x86-gateway": 1_000.0,
        "x86_64": 4_000.0,
    }
)
DEFAULT_INT8_GOPS: Final[Mapping[str, float]] = MappingProxyType(
    {
        "rpi-zero": 4.0,
        "rpi-zero2": 20.0,
        "rpi3": 20.0,
        "rpi4": 60.0,
        "rpi5": 250.0,
        "rpi": 250.0,
        "jetson-nano": 600.0,
        "jetson-tx2": 1_500.0,
        "jetson-xavier-nx": 21_000.0,
        "jetson-agx-xavier": 32_000.0,
        "jetson-xavier": 32_000.0,
        "jetson-orin-nano": 40_000.0,
        "jetson-orin-nx": 100_000.0,
        "jetson-agx-orin": 275_000.0,
        "jetson-orin": 275_000.0,
        "jetson": 275_000.0,
        "aarch64": 2_000.0,
        "x86-gateway": 4_000.0,
        "x86_64": 16_000.0,
    }
)
# A class the table does not name: an x86 host's figures, not the largest Jetson's, so that
# inventing a class name gains nothing over claiming the most common big class.
FALLBACK_FP32_GFLOPS: Final = 4_000.0
FALLBACK_INT8_GOPS: Final = 16_000.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ClaimLimits:
    """Plausible maxima of benchmark claims per device class, and the fallback for others.

    ``fp32`` and ``int8`` are merged over the defaults (a class named in both wins with the
    given figure); every figure must be > 0.
    """

    fp32: Mapping[str, float] = field(default_factory=dict)
    int8: Mapping[str, float] = field(default_factory=dict)
    fallback_fp32: float = FALLBACK_FP32_GFLOPS
    fallback_int8: float = FALLBACK_INT8_GOPS

    def __post_init__(self) -> None:
        fp32 = {**DEFAULT_FP32_GFLOPS, **self.fp32}
        int8 = {**DEFAULT_INT8_GOPS, **self.int8}
        for name, value in (*fp32.items(), *int8.items()):
            if not value > 0:  # also rejects NaN
                raise ValueError(f"claim limit of device class {name!r} must be > 0")
        if not (self.fallback_fp32 > 0 and self.fallback_int8 > 0):
            raise ValueError("fallback claim limits must be > 0")
        object.__setattr__(self, "fp32", MappingProxyType(fp32))
        object.__setattr__(self, "int8", MappingProxyType(int8))

    def limit(self, device_class: str | None, precision: Literal["fp32", "int8"]) -> float:
        """The most a device of ``device_class`` is believed to do at ``precision``."""
        if precision == "int8":
            return self.int8.get(device_class or "", self.fallback_int8)
        return self.fp32.get(device_class or "", self.fallback_fp32)

    def excess(
        self, device_class: str | None, fp32_gflops: float, int8_gops: float | None
    ) -> list[str]:
        """Names of the claims above their class limit (empty when every claim is plausible)."""
        out = []
        if fp32_gflops > self.limit(device_class, "fp32"):
            out.append("fp32_gflops")
        if int8_gops is not None and int8_gops > self.limit(device_class, "int8"):
            out.append("int8_gops")
        return out
