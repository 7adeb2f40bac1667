"""When a new capacity sample is worth an immediate report: :func:`significant_change`.

A pure rule over two :class:`~lepton.protocol.messages.CapacityReport` values, the last one sent and
the new sample; the daemon calls it on every sample and rate-limits what it answers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from lepton.protocol.messages import CapacityReport

BATTERY_THRESHOLDS: Final = (20.0, 10.0)
TEMPERATURE_THRESHOLDS_C: Final = (70.0, 80.0, 90.0)
#: Falling back below a temperature threshold counts only this far below it, so a sensor
#: dithering around the threshold does not report on every sample.
TEMPERATURE_HYSTERESIS_C: Final = 2.0
MEMORY_CHANGE_FRACTION: Final = 0.20


def _free_slots(report: CapacityReport) -> int:
    return max(0, report.slots.total - report.slots.busy)


def _set_change(what: str, old: list[str], new: list[str]) -> str | None:
    added, removed = sorted(set(new) - set(old)), sorted(set(old) - set(new))
    if not added and not removed:
        return None
    parts = [f"+{a}" for a in added] + [f"-{r}" for r in removed]
    return f"{what} changed: {' '.join(parts)}"


def _slots_change(prev: CapacityReport, new: CapacityReport) -> str | None:
    before, after = _free_slots(prev), _free_slots(new)
    return f"free slots {before} -> {after}" if (before == 0) != (after == 0) else None


def _throttle_change(prev: CapacityReport, new: CapacityReport) -> str | None:
    if prev.thermal.throttled == new.thermal.throttled:
        return None
    return "throttling started" if new.thermal.throttled else "throttling ended"


def _battery_change(prev: CapacityReport, new: CapacityReport) -> str | None:
    if prev.battery is None or new.battery is None:
        if (prev.battery is None) == (new.battery is None):
            return None
        return "battery appeared" if new.battery is not None else "battery gone"
    p, n = prev.battery.percent, new.battery.percent
    for threshold in BATTERY_THRESHOLDS:
        if (p < threshold) != (n < threshold):
            return f"battery {p:.0f}% -> {n:.0f}% crossed {threshold:.0f}%"
    plugged = (prev.battery.plugged, new.battery.plugged)
    if None not in plugged and plugged[0] != plugged[1]:
        return "power plugged in" if new.battery.plugged else "power unplugged"
    return None


def _memory_change(prev: CapacityReport, new: CapacityReport) -> str | None:
    p, n = prev.memory.available, new.memory.available
    if abs(n - p) > MEMORY_CHANGE_FRACTION * p or (p == 0 and n > 0):
        return f"available memory {p >> 20} MiB -> {n >> 20} MiB"
    return None


def _temperature_change(prev: CapacityReport, new: CapacityReport) -> str | None:
    p, n = prev.thermal.temperature_c, new.thermal.temperature_c
    if p is None or n is None:
        return None
    for threshold in TEMPERATURE_THRESHOLDS_C:
        if p < threshold <= n:
            return f"temperature {p:.1f} -> {n:.1f} C rose past {threshold:.0f} C"
        if p >= threshold and n < threshold - TEMPERATURE_HYSTERESIS_C:
            return f"temperature {p:.1f} -> {n:.1f} C fell below {threshold:.0f} C"
    return None


def _runtimes_change(prev: CapacityReport, new: CapacityReport) -> str | None:
    return _set_change("runtimes", prev.runtimes, new.runtimes)


def _accelerators_change(prev: CapacityReport, new: CapacityReport) -> str | None:
    return _set_change("accelerators", prev.accelerators, new.accelerators)


def _data_sizes_change(prev: CapacityReport, new: CapacityReport) -> str | None:
    # A federated round bounds what a device may claim by the size it reported before the
    # round, so a size learned (or changed) should reach the coordinator before the next one.
    changed = sorted(
        name
        for name in {*prev.data_sizes, *new.data_sizes}
        if prev.data_sizes.get(name) != new.data_sizes.get(name)
    )
    if not changed:
        return None
    return "data sizes changed: " + " ".join(
        f"{n} {prev.data_sizes.get(n, '?')} -> {new.data_sizes.get(n, '?')}" for n in changed
    )


_CHANGE_RULES: Final[tuple[Callable[[CapacityReport, CapacityReport], str | None], ...]] = (
    _slots_change,
    _throttle_change,
    _battery_change,
    _memory_change,
    _temperature_change,
    _runtimes_change,
    _accelerators_change,
    _data_sizes_change,
)


def significant_change(prev: CapacityReport, new: CapacityReport) -> str | None:
    """Why ``new`` deserves an immediate report compared with ``prev``, or None.

    Reasons: free slots going to or from zero, throttling starting or ending, the battery
    crossing 20 % or 10 % (or power being plugged/unplugged), available memory moving by more
    than 20 %, the die temperature crossing 70/80/90 C (2 C hysteresis on the way down), and
    the runtimes, accelerators or data source sizes changing. ``prev`` should be the last
    report *sent*, so slow drifts add up until they count and the hysteresis works. The
    caller rate-limits.
    """
    for rule in _CHANGE_RULES:
        reason = rule(prev, new)
        if reason is not None:
            return reason
    return None
