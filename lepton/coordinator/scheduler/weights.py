"""Configuration of the cost model: how the terms combine, and the hard filters' thresholds."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from lepton.coordinator.scheduler.claims import (
    FALLBACK_FP32_GFLOPS,
    FALLBACK_INT8_GOPS,
    ClaimLimits,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class CostWeights:
    """How the cost terms combine, and the thresholds of the hard filters.

    ``time`` weighs seconds of completion time, ``energy`` joules, ``battery`` drain-weighted
    seconds on battery. ``max_temperature_c`` removes devices at or above it (as does a
    throttled flag). ``battery_floor`` (percent) applies to unplugged devices unless a task
    sets its own ``min_battery``. ``backlog_task_s`` is the assumed length of a task already
    queued or running on a device that does not report its backlog in seconds. A device's
    power draw under load is its own ``power_w``, else ``power_w_by_class[device_class]``,
    else ``default_power_w``; ``radio_power_w`` is the draw while transferring.

    A device's bench claims are believed up to ``max_fp32_gflops_by_class[device_class]``
    and ``max_int8_gops_by_class[device_class]`` (merged over the built-in table of
    :mod:`lepton.coordinator.scheduler.claims`), else ``max_fp32_gflops`` / ``max_int8_gops``.
    """

    time: float = 1.0
    energy: float = 0.0
    battery: float = 0.0
    max_temperature_c: float = 80.0
    battery_floor: float = 20.0
    backlog_task_s: float = 1.0
    default_power_w: float = 5.0
    radio_power_w: float = 1.0
    power_w_by_class: Mapping[str, float] = field(default_factory=dict)
    max_fp32_gflops: float = FALLBACK_FP32_GFLOPS
    max_int8_gops: float = FALLBACK_INT8_GOPS
    max_fp32_gflops_by_class: Mapping[str, float] = field(default_factory=dict)
    max_int8_gops_by_class: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if min(self.time, self.energy, self.battery) < 0:
            raise ValueError("cost weights must be >= 0")
        if self.backlog_task_s < 0 or self.default_power_w < 0 or self.radio_power_w < 0:
            raise ValueError("backlog_task_s and power figures must be >= 0")
        self.claim_limits()  # raises ValueError on a limit that is not > 0

    def claim_limits(self) -> ClaimLimits:
        """The bounds on devices' bench claims these weights configure."""
        return ClaimLimits(
            fp32=self.max_fp32_gflops_by_class,
            int8=self.max_int8_gops_by_class,
            fallback_fp32=self.max_fp32_gflops,
            fallback_int8=self.max_int8_gops,
        )
