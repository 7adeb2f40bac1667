"""Fast assignment for batches too large for the exact solver: greedy, then local re-solves.

1. **Backward greedy.** Tasks are taken longest first (by their best processing time) and each
   goes to the lane position with the lowest marginal cost ``k * P[j, i] + R[j, i]``, where k
   is the next free position from the end of that device's least-filled lane. Later tasks
   are shorter and run before it, so its position, and the cost it was placed at, stay put
   (exactly so where devices rank tasks alike; the final schedule re-sorts every device
   shortest first, which can only lower the total).
2. **Large-neighbourhood search.** Until the time budget runs out or a full round brings no
   gain, pick a random group of devices and re-solve the tasks on them exactly
   (:func:`lepton.coordinator.scheduler.exact.solve` on the sub-problem). Each step can only lower
   the total, and random groups mix fast and slow devices so work moves between them.
"""

from __future__ import annotations

import time

import numpy as np
import numpy.typing as npt

from lepton.coordinator.scheduler import exact
from lepton.coordinator.scheduler.schedule import positional_cost

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

# Sub-problems of about this many (task x column) cells solve in a few milliseconds; the
# assignment solver is cubic, so many small groups beat a few large ones under a budget.
NEIGHBOURHOOD_CELLS = 30_000
NEIGHBOURHOOD_MAX_DEVICES = 12


def greedy(
    p: FloatArray, r: FloatArray, lanes: IntArray, *, rows: IntArray | None = None
) -> IntArray:
    """Backward greedy over ``rows`` of ``p`` (default all; each needs a finite entry).

    Returns the device of each row in ``rows`` order.
    """
    m = p.shape[1]
    row_ids = np.arange(p.shape[0]) if rows is None else rows
    n = len(row_ids)
    out = np.empty(n, dtype=np.int64)
    if n == 0:
        return out
    size = np.min(p, axis=1)[row_ids]
    order = np.argsort(-size, kind="stable")
    counts = [0] * m
    lane_list = lanes.tolist()
    nextk = np.ones(m)
    buf = np.empty(m)
    per_pair = r.ndim == 2
    for local, j in zip(order.tolist(), row_ids[order].tolist(), strict=True):
        np.multiply(p[j], nextk, out=buf)
        buf += r[j] if per_pair else r
        i = int(buf.argmin())
        out[local] = i
        c = counts[i] + 1
        counts[i] = c
        nextk[i] = c // lane_list[i] + 1
    return out


def improve(
    p: FloatArray,
    r: FloatArray,
    lanes: IntArray,
    assign: IntArray,
    *,
    deadline: float,
    rng: np.random.Generator,
    rows: IntArray | None = None,
    max_devices: int = NEIGHBOURHOOD_MAX_DEVICES,
    cells: int = NEIGHBOURHOOD_CELLS,
) -> tuple[IntArray, int]:
    """Large-neighbourhood search on ``assign`` (the device of each of ``rows``, default all
    rows of ``p``) until ``deadline`` (``time.perf_counter``).

    Returns the improved assignment and the number of sub-problems solved. Stops early when a
    round over all devices brings no gain.
    """
    m = p.shape[1]
    row_ids = np.arange(p.shape[0]) if rows is None else rows
    n = len(assign)
    assign = assign.copy()
    if n == 0 or m < 2:
        return assign, 0
    per_pair = r.ndim == 2
    load = np.bincount(assign, minlength=m)
    tasks_per_device = max(n / m, 1.0)
    # Enough devices that tasks can move, few enough that the sub-problem stays small.
    size = int(np.clip(np.sqrt(cells / tasks_per_device**2), 2, max_devices))
    size = min(size, m - 1) if m > 2 else 2
    solved = 0
    stale = 0
    longest = 0.0  # slowest step so far: do not start one that would overrun the deadline
    while time.perf_counter() + longest < deadline and stale < max(m // size, 1) + 1:
        began = time.perf_counter()
        group = rng.choice(m, size=size, replace=False)
        # Half the groups are busy devices only (rebalance among them), half may include
        # idle ones (so work can spread to them).
        group = group[load[group] > 0] if rng.random() < 0.5 else group
        if len(group) < 2:
            stale += 1
            continue
        member = np.zeros(m, dtype=bool)
        member[group] = True
        mine = np.flatnonzero(member[assign])
        if len(mine) < 2:
            stale += 1
            continue
        local = np.full(m, -1, dtype=np.int64)
        local[group] = np.arange(len(group))
        cells_at = np.ix_(row_ids[mine], group)
        sub_p = p[cells_at]
        sub_r = r[cells_at] if per_pair else r[group]
        sub_lanes = lanes[group]
        current = local[assign[mine]]
        before = positional_cost(sub_p, sub_r, sub_lanes, current)
        new = exact.solve(sub_p, sub_r, sub_lanes, current)
        solved += 1
        after = positional_cost(sub_p, sub_r, sub_lanes, new)
        if after < before * (1.0 - 1e-9):
            assign[mine] = group[new]
            load = np.bincount(assign, minlength=m)
            stale = 0
        else:
            stale += 1
        longest = max(longest, time.perf_counter() - began)
    return assign, solved


def solve(
    p: FloatArray,
    r: FloatArray,
    lanes: IntArray,
    *,
    deadline: float,
    seed: int = 0,
) -> tuple[IntArray, int]:
    """Greedy, then local improvement until ``deadline``; returns (assignment, sub-solves)."""
    start = greedy(p, r, lanes)
    return improve(p, r, lanes, start, deadline=deadline, rng=np.random.default_rng(seed))


__all__ = ["greedy", "improve", "solve"]
