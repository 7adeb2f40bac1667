"""From an assignment (task -> device) to a timed schedule, and the positional cost it has.

A device runs the tasks it receives shortest first over its lanes (list scheduling in SPT
order), which minimises their total completion time on identical lanes. Sorted longest
first, the t-th task of a device with L lanes sits on lane ``t mod L`` at position
``k = t // L + 1`` from the end, and adds ``k * proc`` to the total completion time: every
task that runs after it on its lane waits for it. This is the column structure of the exact
assignment formulation (see :mod:`lepton.coordinator.scheduler.exact`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from lepton.coordinator.scheduler.costmodel import CostComponents

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class Schedule:
    """Per task: device index (-1 unassigned), lane, expected start and completion (seconds
    from now, ``nan`` when unassigned); totals over assigned tasks."""

    device: IntArray
    lane: IntArray
    start: FloatArray
    completion: FloatArray
    total_completion: float
    makespan: float
    cost: float


def positions(proc: FloatArray, device: IntArray, lanes: IntArray) -> tuple[IntArray, IntArray]:
    """``(k, lane)`` of each task: its position from the end of its lane, and the lane.

    ``proc`` and ``device`` are per task (all assigned); ``lanes`` per device.
    """
    n = len(device)
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    order = np.lexsort((-proc, device))
    dev_sorted = device[order]
    first = np.ones(n, dtype=bool)
    first[1:] = dev_sorted[1:] != dev_sorted[:-1]
    starts = np.flatnonzero(first)
    group_start = np.repeat(starts, np.diff(np.append(starts, n)))
    rank = np.arange(n) - group_start
    lane_count = lanes[dev_sorted]
    k = np.empty(n, dtype=np.int64)
    lane = np.empty(n, dtype=np.int64)
    k[order] = rank // lane_count + 1
    lane[order] = rank % lane_count
    return k, lane


def positional_cost(p: FloatArray, r: FloatArray, lanes: IntArray, device: IntArray) -> float:
    """Total ``k * P + R`` of an assignment of every row of ``p`` to ``device``.

    ``p`` and ``r`` are the position costs of :meth:`CostComponents.position_costs` (``r``
    either per pair or per device).
    """
    rows = np.arange(len(device))
    pj = p[rows, device]
    k, _ = positions(pj, device, lanes)
    fixed = r[rows, device] if r.ndim == 2 else r[device]
    return float(np.sum(k * pj) + np.sum(fixed))


def evaluate(comps: CostComponents, device: IntArray) -> Schedule:
    """Time the assignment ``device`` (per task; -1 leaves a task out) under ``comps``."""
    n = comps.shape[0]
    start = np.full(n, np.nan)
    completion = np.full(n, np.nan)
    lane_out = np.full(n, -1, dtype=np.int64)
    rows = np.flatnonzero(device >= 0)
    if len(rows) == 0:
        return Schedule(device.copy(), lane_out, start, completion, 0.0, 0.0, 0.0)
    dev = device[rows]
    proc = comps.proc[rows, dev]
    if not np.all(np.isfinite(proc)):
        raise ValueError("assignment uses a filtered-out (task, device) pair")
    _, lane = positions(proc, dev, comps.lanes)
    # Run each lane shortest first: completion = queue + running sum of its lane.
    order = np.lexsort((proc, lane, dev))
    p_sorted = proc[order]
    key_dev, key_lane = dev[order], lane[order]
    first = np.ones(len(rows), dtype=bool)
    first[1:] = (key_dev[1:] != key_dev[:-1]) | (key_lane[1:] != key_lane[:-1])
    csum = np.cumsum(p_sorted)
    before = np.where(first, csum - p_sorted, 0.0)
    base = np.maximum.accumulate(np.where(first, np.arange(len(rows)), 0))
    done = csum - before[base] + comps.queue[key_dev]
    comp_rows = np.empty(len(rows))
    comp_rows[order] = done
    completion[rows] = comp_rows
    start[rows] = comp_rows - proc
    lane_out[rows] = lane
    total = float(comp_rows.sum())
    cost = comps.time_weight * total
    if comps.extra is not None:
        cost += float(comps.extra[rows, dev].sum())
    return Schedule(device.copy(), lane_out, start, completion, total, float(comp_rows.max()), cost)
