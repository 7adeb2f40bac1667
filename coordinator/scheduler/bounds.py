"""Lower bounds on the makespan, to judge any plan against.

Simple bounds: no schedule ends before its longest task does at its best
(``max_j min_i (queue_i + proc_ij)``), nor before the fleet has done the least total work
(``sum_j min_i proc_ij`` over every lane).

LP bound: a schedule with makespan T can only use pairs with ``queue_i + proc_ij <= T``, and
loads device i by at most ``lanes_i * max(0, T - queue_i)``. Whether a fractional assignment
meets those limits is a linear program (the relaxation of Lenstra, Shmoys and Tardos, 1990);
the smallest T for which it is feasible bounds the optimum from below. T is found by
bisection, each step solved with :func:`scipy.optimize.linprog` (HiGHS).

To keep each LP small, similar tasks and similar devices are pooled: a pool of tasks takes
the smallest processing time of its members on every device, and a pool of devices the
smallest time of its members with their capacities added. Both only enlarge the feasible
set, so the pooled bound is still a lower bound, a little below the unpooled LP.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from scipy import sparse
from scipy.optimize import linprog

from coordinator.scheduler.costmodel import CostComponents, CostModel
from coordinator.scheduler.model import DeviceState, TaskSpec

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def simple_makespan_bound(comps: CostComponents) -> float:
    """The larger of the longest-task and total-work bounds (tasks with no device skipped)."""
    proc = comps.proc
    rows = np.isfinite(proc).any(axis=1)
    if not rows.any():
        return 0.0
    proc = proc[rows]
    longest = float(np.min(proc + comps.queue[None, :], axis=1).max())
    work = float(np.min(proc, axis=1).sum()) / float(max(comps.lanes.sum(), 1))
    return max(longest, work)


def _pool(features: FloatArray, signature: IntArray, limit: int) -> IntArray:
    """Pool ids for rows of ``features`` (log scale): same signature, same bins; the bins
    widen until there are at most ``limit`` pools (or signatures alone exceed it)."""
    width = 0.005
    while True:
        bins = np.floor(features / width).astype(np.int64)
        key = np.column_stack([signature, bins])
        _, ids = np.unique(key, axis=0, return_inverse=True)
        ids = ids.ravel().astype(np.int64)
        if ids.max(initial=-1) + 1 <= limit or width > 64:
            return ids
        width *= 1.5


def _signature(mask: npt.NDArray[np.bool_]) -> IntArray:
    _, ids = np.unique(np.packbits(mask, axis=1), axis=0, return_inverse=True)
    return ids.ravel().astype(np.int64)


def _features(p: FloatArray) -> FloatArray:
    finite = np.isfinite(p)
    lo = np.log(np.maximum(np.min(p, axis=1), 1e-12))
    hi = np.log(np.maximum(np.max(np.where(finite, p, 0.0), axis=1), 1e-12))
    return np.column_stack([lo, hi])


def _reduce_min(a: FloatArray, ids: IntArray, count: int, axis: int) -> FloatArray:
    order = np.argsort(ids, kind="stable")
    starts = np.searchsorted(ids[order], np.arange(count))
    return np.minimum.reduceat(np.take(a, order, axis=axis), starts, axis=axis)


def lp_makespan_bound(
    comps: CostComponents,
    *,
    task_pools: int = 400,
    device_pools: int = 120,
    rel_tol: float = 2e-3,
    upper: float | None = None,
) -> float:
    """Pooled LP relaxation bound on the makespan (see module doc); ``upper`` is any known
    makespan (it narrows the bisection)."""
    proc = comps.proc
    keep = np.isfinite(proc).any(axis=1)
    proc = proc[keep]
    if proc.shape[0] == 0:
        return 0.0
    queue, lanes = comps.queue, comps.lanes.astype(float)
    used = np.isfinite(proc).any(axis=0)
    proc, queue, lanes = proc[:, used], queue[used], lanes[used]
    task_ids = _pool(_features(proc), _signature(np.isfinite(proc)), task_pools)
    n_tp = int(task_ids.max()) + 1
    counts = np.bincount(task_ids, minlength=n_tp).astype(float)
    pooled = _reduce_min(proc, task_ids, n_tp, axis=0)  # (task pools, devices)
    dev_feat = _features(pooled.T)
    dev_ids = _pool(dev_feat, _signature(np.isfinite(pooled.T)), device_pools)
    n_dp = int(dev_ids.max()) + 1

    def feasible(t: float) -> bool:
        allowed = np.where(pooled + queue[None, :] <= t, pooled, np.inf)
        cap_dev = lanes * np.maximum(t - queue, 0.0)
        p = _reduce_min(allowed, dev_ids, n_dp, axis=1)  # (task pools, device pools)
        cap = np.bincount(dev_ids, weights=cap_dev, minlength=n_dp)
        g, d = np.nonzero(np.isfinite(p))
        if np.any(np.bincount(g, minlength=n_tp) == 0):
            return False  # some pool has no device that can finish it by t
        nv = len(g)
        a_eq = sparse.csr_matrix((np.ones(nv), (g, np.arange(nv))), shape=(n_tp, nv))
        a_ub = sparse.csr_matrix((p[g, d], (d, np.arange(nv))), shape=(n_dp, nv))
        res = linprog(
            np.zeros(nv),
            A_ub=a_ub,
            b_ub=cap,
            A_eq=a_eq,
            b_eq=counts,
            bounds=(0, None),
            method="highs",
        )
        return bool(res.status == 0)

    lo = simple_makespan_bound(comps)
    hi = upper if upper is not None and upper >= lo else max(lo, 1e-9) * 2.0
    while not feasible(hi):
        lo, hi = hi, hi * 2.0
    if feasible(lo):
        return lo
    while hi - lo > rel_tol * hi:
        mid = 0.5 * (lo + hi)
        if feasible(mid):
            hi = mid
        else:
            lo = mid
    return lo


def makespan_lower_bound(
    tasks: Sequence[TaskSpec],
    devices: Sequence[DeviceState],
    model: CostModel,
    *,
    lp: bool = True,
    upper: float | None = None,
) -> float:
    """A lower bound on the makespan of any plan of ``tasks`` (those with no feasible device
    are left out): the pooled LP bound, or only the simple bounds when ``lp`` is false."""
    comps = model.components(tasks, devices)
    if lp:
        return lp_makespan_bound(comps, upper=upper)
    return simple_makespan_bound(comps)
