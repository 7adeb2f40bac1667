"""Exact minimum total cost on unrelated parallel lanes, as one assignment problem.

Minimising total completion time on unrelated parallel machines (R||sum C_j) is a bipartite
assignment (Horn 1973; Bruno, Coffman and Sethi 1974): expand every lane of every device into
positions k = 1, 2, ... counted from the end of the lane; task j in position k of a lane of
device i costs ``k * P[j, i] + R[j, i]``, because it delays itself and the k - 1 tasks that
run after it. Positions fill from k = 1 in any optimal solution, so each device needs at most
as many columns as tasks it could take, and position k is only useful while
``LB + k (k - 1) / 2 * min_j P[j, i] <= UB`` (placing anything at k forces k - 1 more tasks
onto that lane, each at least ``min_j P[j, i]`` above its own best single cost); ``UB`` is the
cost of any feasible assignment (the fast solver's), ``LB`` the sum of every task's cheapest
single cost. Within that cap, columns are added lazily (see :func:`solve`), and each
restricted matrix goes to :func:`scipy.optimize.linear_sum_assignment`.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
from scipy.optimize import linear_sum_assignment

from lepton.coordinator.scheduler.schedule import positional_cost

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def _caps(p: FloatArray, r: FloatArray, lanes: IntArray, upper: float) -> IntArray:
    """Most columns any device can need in an optimal solution, given an upper bound."""
    m = p.shape[1]
    feas = np.isfinite(p)
    takers = feas.sum(axis=0)
    single = p + (r if r.ndim == 2 else r[None, :])
    lower = float(np.min(single, axis=1).sum())
    gap = max(upper - lower, 0.0) * (1.0 + 1e-9) + 1e-12
    pmin = np.min(p, axis=0)  # inf where no task can use the device
    k_max = np.empty(m, dtype=np.int64)
    for i in range(m):
        if takers[i] == 0:
            k_max[i] = 0
        elif pmin[i] > 0 and math.isfinite(gap / pmin[i]):
            k_max[i] = int((1.0 + math.sqrt(1.0 + 8.0 * gap / pmin[i])) / 2.0)
        else:
            k_max[i] = takers[i]
    out: IntArray = np.minimum(np.maximum(k_max, 1) * lanes, takers)
    return out


def _columns(width: IntArray, lanes: IntArray) -> tuple[IntArray, IntArray]:
    """``(device, k)`` of the first ``width[i]`` columns of every device i, k ascending."""
    m = len(width)
    dev = np.repeat(np.arange(m, dtype=np.int64), width)
    first = np.repeat(np.cumsum(width) - width, width)
    k = (np.arange(len(dev), dtype=np.int64) - first) // lanes[dev] + 1
    return dev, k


def initial_width(
    p: FloatArray, r: FloatArray, lanes: IntArray, incumbent: IntArray
) -> tuple[IntArray, IntArray]:
    """``(width, cap)``: the columns to start with (the incumbent's, plus two positions per
    lane, so tasks can move without a second round most of the time) and the most any
    device can need."""
    cap = _caps(p, r, lanes, positional_cost(p, r, lanes, incumbent))
    counts = np.bincount(incumbent, minlength=p.shape[1])
    cap = np.maximum(cap, counts)  # the bound holds in exact arithmetic; rounding aside
    return np.minimum(counts + 2 * lanes, cap), cap


def column_count(p: FloatArray, r: FloatArray, lanes: IntArray, incumbent: IntArray) -> int:
    """How many columns :func:`solve` starts with (to size the problem before solving)."""
    return int(initial_width(p, r, lanes, incumbent)[0].sum())


def solve(p: FloatArray, r: FloatArray, lanes: IntArray, incumbent: IntArray) -> IntArray:
    """Optimal device per row of ``p``; ``incumbent`` is any feasible assignment.

    Every row must have at least one finite entry. ``r`` is per pair ``(n, m)`` or per
    device ``(m,)``; ``lanes`` per device.

    Columns are generated lazily: start with the incumbent's positions plus two per lane;
    a restricted optimum that leaves at least one column of every truncated device unused
    is optimal for the full problem (an unused column has dual value 0, and every omitted
    column of that device costs at least as much for every task), else the saturated
    devices get more columns and the problem is solved again.
    """
    n = p.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    width, cap = initial_width(p, r, lanes, incumbent)
    upper = positional_cost(p, r, lanes, incumbent)
    while True:
        dev, k = _columns(width, lanes)
        cost = p[:, dev] * k[None, :]
        cost += r[:, dev] if r.ndim == 2 else r[dev][None, :]
        rows, cols = linear_sum_assignment(cost)
        out = np.empty(n, dtype=np.int64)
        out[rows] = dev[cols]
        used = np.bincount(out, minlength=len(width))
        saturated = (used >= width) & (width < cap)
        if not saturated.any():
            break
        width = np.where(saturated, np.minimum(2 * width + lanes, cap), width)
    # Ties or rounding can make the solver's answer cost a hair more than the incumbent.
    if positional_cost(p, r, lanes, out) > upper:
        return incumbent.copy()
    return out
