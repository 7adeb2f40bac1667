"""Hard filters: which devices may run a task at all, and why not.

Checked in :data:`REASONS` order; the first that applies is the reason reported. The cost
matrix applies the same rules vectorised (:meth:`CostModel.components`); this module gives
the reason for one pair and, vectorised, the reason codes of whole rows.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from lepton.coordinator.scheduler.types import DeviceState, TaskSpec
from lepton.coordinator.scheduler.weights import CostWeights

BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]
Codes = npt.NDArray[np.uint8]

# Filter reasons in the order they are checked; code k (1-based) is REASONS[k - 1], 0 = feasible.
REASONS: Final = (
    "offline",
    "pinned",
    "slots",
    "runtime",
    "accelerator",
    "data",
    "memory",
    "thermal",
    "battery",
)
CODE: Final = {name: k + 1 for k, name in enumerate(REASONS)}


def thermal_ok(device: DeviceState, weights: CostWeights) -> bool:
    t = device.temperature_c
    return not device.throttled and (t is None or t < weights.max_temperature_c)


def battery_level(device: DeviceState) -> float:
    """Charge that counts against a floor: ``inf`` on mains (or without a battery)."""
    if device.battery_percent is None or device.plugged is True:
        return math.inf
    return device.battery_percent


def battery_floor(task: TaskSpec, weights: CostWeights) -> float:
    return weights.battery_floor if task.min_battery is None else task.min_battery


def reason(task: TaskSpec, device: DeviceState, weights: CostWeights) -> str | None:  # noqa: PLR0911
    """``None`` when ``device`` may run ``task``, else the first filter that removes it."""
    if not device.online:
        return "offline"
    if task.device_id is not None and task.device_id != device.device_id:
        return "pinned"
    if device.slots_total <= 0:
        return "slots"
    if task.runtime is not None and task.runtime not in device.runtimes:
        return "runtime"
    if task.accelerator is not None and task.accelerator not in device.accelerators:
        return "accelerator"
    if task.data_source is not None and task.data_source not in device.data_sources:
        return "data"
    if task.memory_bytes > device.mem_available:
        return "memory"
    if not thermal_ok(device, weights):
        return "thermal"
    if battery_level(device) < battery_floor(task, weights):
        return "battery"
    return None


@dataclass(frozen=True, slots=True)
class _Filter:
    code: int
    rows: IntArray | None  # task rows it applies to; None: all
    bad: BoolArray  # (m,) or (len(rows), m); True where the pair is filtered out


def _filters(
    tasks: Sequence[TaskSpec], devices: Sequence[DeviceState], weights: CostWeights
) -> list[_Filter]:
    """Every filter that can remove a pair, in :data:`REASONS` order."""
    m = len(devices)
    index = {d.device_id: i for i, d in enumerate(devices)}
    offline = np.fromiter((not d.online for d in devices), np.bool_, m)
    out: list[_Filter] = [_Filter(CODE["offline"], None, offline)]
    pins = [(j, t.device_id) for j, t in enumerate(tasks) if t.device_id is not None]
    if pins:
        rows = np.fromiter((j for j, _ in pins), np.int64, len(pins))
        target = np.fromiter((index.get(d, -1) for _, d in pins), np.int64, len(pins))
        out.append(_Filter(CODE["pinned"], rows, np.arange(m)[None, :] != target[:, None]))
    no_slots = np.fromiter((d.slots_total <= 0 for d in devices), np.bool_, m)
    out.append(_Filter(CODE["slots"], None, no_slots))
    for attr, name, held in (
        ("runtime", "runtime", "runtimes"),
        ("accelerator", "accelerator", "accelerators"),
        ("data_source", "data", "data_sources"),
    ):
        need: dict[str, list[int]] = defaultdict(list)
        for j, t in enumerate(tasks):
            value = getattr(t, attr)
            if value is not None:
                need[value].append(j)
        for value, js in need.items():
            has = np.fromiter((value in getattr(d, held) for d in devices), np.bool_, m)
            out.append(_Filter(CODE[name], np.asarray(js, dtype=np.int64), ~has))
    mem_rows = [j for j, t in enumerate(tasks) if t.memory_bytes > 0]
    if mem_rows:
        rows = np.asarray(mem_rows, dtype=np.int64)
        need_mem = np.fromiter((tasks[j].memory_bytes for j in mem_rows), float, len(rows))
        mem = np.fromiter((d.mem_available for d in devices), float, m)
        out.append(_Filter(CODE["memory"], rows, need_mem[:, None] > mem[None, :]))
    hot = np.fromiter((not thermal_ok(d, weights) for d in devices), np.bool_, m)
    out.append(_Filter(CODE["thermal"], None, hot))
    level = np.fromiter((battery_level(d) for d in devices), float, m)
    if np.isfinite(level).any():
        floors: dict[float, list[int]] = defaultdict(list)
        for j, t in enumerate(tasks):
            floors[battery_floor(t, weights)].append(j)
        for floor, js in floors.items():
            bad = level < floor
            if bad.any():
                some = None if len(js) == len(tasks) else np.asarray(js, dtype=np.int64)
                out.append(_Filter(CODE["battery"], some, bad))
    return out


def reason_codes(
    tasks: Sequence[TaskSpec], devices: Sequence[DeviceState], weights: CostWeights
) -> Codes:
    """``codes[j, i]``: 0 when device i may run task j, else k for ``REASONS[k - 1]``."""
    codes = np.zeros((len(tasks), len(devices)), dtype=np.uint8)
    for f in reversed(_filters(tasks, devices, weights)):  # earlier filters win
        if f.rows is None:
            codes[:, f.bad] = f.code
            continue
        sub = codes[f.rows]
        sub[np.broadcast_to(f.bad, sub.shape)] = f.code
        codes[f.rows] = sub
    return codes


def summarize(codes_row: Codes) -> dict[str, int]:
    """Reason -> devices it removed, most frequent first (ties in check order)."""
    counts = np.bincount(codes_row, minlength=len(REASONS) + 1)
    ranked = sorted((-int(c), k) for k, c in enumerate(counts) if k and c)
    return {REASONS[k - 1]: -c for c, k in ranked}


class FilterReasons:
    """Why pairs were filtered out: ``reasons[j, i]`` is a reason name or ``None``.

    Computed on demand from the same rules as the cost matrix, so building a matrix for a
    large batch does not pay for reasons nobody reads.
    """

    __slots__ = ("_devices", "_tasks", "_weights")

    def __init__(
        self, weights: CostWeights, tasks: Sequence[TaskSpec], devices: Sequence[DeviceState]
    ) -> None:
        self._weights, self._tasks, self._devices = weights, tasks, devices

    def __getitem__(self, pair: tuple[int, int]) -> str | None:
        j, i = pair
        return reason(self._tasks[j], self._devices[i], self._weights)

    def codes(self, rows: Sequence[int] | None = None) -> Codes:
        """Reason codes (0 feasible, k: ``REASONS[k - 1]``) for ``rows`` (default: all)."""
        tasks = self._tasks if rows is None else [self._tasks[j] for j in rows]
        return reason_codes(tasks, self._devices, self._weights)

    def summary(self, j: int) -> dict[str, int]:
        """How many devices each reason removed for task j, most frequent first."""
        return summarize(self.codes([j])[0])
