"""Lower bounds on the makespan, to judge any plan against.

Simple bounds: no schedule ends before its longest task does at its best
(``max_j min_i (queue_i + proc_ij)``), nor before the fleet has done the least total work
(``sum_j min_i proc_ij`` over every lane).

LP bound: a schedule with makespan T can only use pairs with ``queue_i + proc_ij <= T``, and
loads device i by at most ``lanes_i * max(0, T - queue_i)``. Whether a fractional assignment
meets those limits is a linear program (the relaxation of Lenstra, Shmoys and Tardos, 1990);
the smallest T for which it is feasible bounds the optimum from below. T is found by
bisection, each step solved with :func:`scipy.optimize.linprog` (HiGHS), scaled to the probed
makespan and under a time limit. A probe HiGHS does not settle (numerical difficulties, a time
limit) is unknown: it never raises the bound (Finding 13 of the hardening review: counting
it as infeasible could lift the "bound" above the optimum, and doubling past such probes
could run for ever).

To keep each LP small, similar tasks and similar devices are pooled: a pool of tasks takes
the smallest processing time of its members on every device, and a pool of devices the
smallest time of its members with their capacities added. Both only enlarge the feasible
set, so the pooled bound is still a lower bound, a little below the unpooled LP.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from scipy import sparse
from scipy.optimize import linprog

from lepton.coordinator.scheduler.costmodel import CostComponents, CostModel
from lepton.coordinator.scheduler.types import DeviceState, TaskSpec

log = logging.getLogger(__name__)

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


@dataclass(frozen=True, slots=True)
class LpBound:
    """A lower bound on the makespan and how it was reached.

    ``value`` is always a valid lower bound: it only ever rises to a makespan the LP proved
    infeasible (or the simple bounds). ``proven`` is true when the bisection closed to its
    tolerance with every probe answered; otherwise ``reason`` says why it stopped early
    (probes the solver could not answer, or the time limit) and ``value`` may sit below the
    LP's own bound. ``probes`` counts the LP answers by outcome.
    """

    value: float
    proven: bool
    probes: dict[str, int] = field(default_factory=dict)
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class _PooledLp:
    """The feasibility LP of one batch, pooled (see module doc), probed at any makespan."""

    pooled: FloatArray  # (task pools, devices): smallest processing time in the pool
    queue: FloatArray
    lanes: FloatArray
    counts: FloatArray  # tasks per task pool
    dev_ids: IntArray  # device -> device pool
    n_dp: int

    @classmethod
    def build(
        cls, proc: FloatArray, queue: FloatArray, lanes: FloatArray, task_pools: int, dev_pools: int
    ) -> _PooledLp:
        task_ids = _pool(_features(proc), _signature(np.isfinite(proc)), task_pools)
        n_tp = int(task_ids.max()) + 1
        pooled = _reduce_min(proc, task_ids, n_tp, axis=0)
        dev_ids = _pool(_features(pooled.T), _signature(np.isfinite(pooled.T)), dev_pools)
        counts = np.bincount(task_ids, minlength=n_tp).astype(float)
        return cls(pooled, queue, lanes, counts, dev_ids, int(dev_ids.max()) + 1)

    def probe(self, t: float, time_limit_s: float) -> tuple[bool | None, str]:
        """``(True, _)``: feasible at makespan t; ``(False, _)``: proven infeasible;
        ``(None, why)``: the solver did not settle it."""
        n_tp = len(self.counts)
        allowed = np.where(self.pooled + self.queue[None, :] <= t, self.pooled, np.inf)
        p = _reduce_min(allowed, self.dev_ids, self.n_dp, axis=1)  # (task pools, dev pools)
        g, d = np.nonzero(np.isfinite(p))
        if np.any(np.bincount(g, minlength=n_tp) == 0):
            return False, "a pool has no device that can finish it in time"
        # Variables: the fraction of task pool g placed on device pool d. Divided by t, every
        # coefficient is at most the pool's size and every right-hand side at most the lanes.
        cap_dev = self.lanes * np.maximum(1.0 - self.queue / t, 0.0)
        cap = np.bincount(self.dev_ids, weights=cap_dev, minlength=self.n_dp)
        nv = len(g)
        a_eq = sparse.csr_matrix((np.ones(nv), (g, np.arange(nv))), shape=(n_tp, nv))
        coef = p[g, d] * self.counts[g] / t
        a_ub = sparse.csr_matrix((coef, (d, np.arange(nv))), shape=(self.n_dp, nv))
        res = linprog(
            np.zeros(nv),
            A_ub=a_ub,
            b_ub=cap,
            A_eq=a_eq,
            b_eq=np.ones(n_tp),
            bounds=(0, None),
            method="highs",
            options={"time_limit": time_limit_s, "presolve": True},
        )
        if res.status == 0:
            return True, ""
        if res.status == 2:
            return False, str(res.message)
        return None, f"the LP solver did not answer a probe: {res.message}"


def lp_bound(
    comps: CostComponents,
    *,
    task_pools: int = 400,
    device_pools: int = 120,
    rel_tol: float = 2e-3,
    upper: float | None = None,
    time_limit_s: float = 60.0,
    probe_time_limit_s: float = 20.0,
) -> LpBound:
    """Pooled LP relaxation bound on the makespan (see module doc), within ``time_limit_s``.

    ``upper`` is any known makespan (it narrows the bisection). Each probe's LP is scaled to
    the probed makespan and solved within ``probe_time_limit_s``; a probe the solver does not
    answer with "optimal" or "infeasible" (a time limit, numerical difficulties) counts as
    unknown and never raises the bound.
    """
    deadline = time.monotonic() + time_limit_s
    probes = {"feasible": 0, "infeasible": 0, "unknown": 0}
    proc = comps.proc[np.isfinite(comps.proc).any(axis=1)]
    lo = simple_makespan_bound(comps)
    if proc.shape[0] == 0:
        return LpBound(0.0, True, probes)
    used = np.isfinite(proc).any(axis=0)
    proc, queue, lanes = proc[:, used], comps.queue[used], comps.lanes[used].astype(float)
    lp = _PooledLp.build(proc, queue, lanes, task_pools, device_pools)
    # Every task on its fastest device is a schedule; the LP is feasible at its makespan.
    hi = _greedy_makespan(proc, queue, lanes)
    if upper is not None and lo <= upper < hi:
        hi = upper
    reason: str | None = None
    t = lo
    while hi > lo:
        left = deadline - time.monotonic()
        if left <= 0:
            reason = f"time limit of {time_limit_s:g} s reached"
            break
        answer, why = lp.probe(t, min(probe_time_limit_s, left))
        probes[{True: "feasible", False: "infeasible", None: "unknown"}[answer]] += 1
        if answer is False:
            lo = t
        else:
            # Feasible, or unknown: either way look below t. An unknown probe never raises
            # the bound, so the bound stays valid, if looser than it could be.
            hi = t
            if answer is None:
                reason = why
                log.info("makespan bound: probe at %.6g s unknown: %s", t, why)
        if hi - lo <= rel_tol * hi:
            break
        t = 0.5 * (lo + hi)
    return LpBound(lo, reason is None, probes, reason)


def lp_makespan_bound(
    comps: CostComponents,
    *,
    task_pools: int = 400,
    device_pools: int = 120,
    rel_tol: float = 2e-3,
    upper: float | None = None,
    time_limit_s: float = 60.0,
) -> float:
    """The value of :func:`lp_bound`: a valid lower bound on the makespan."""
    return lp_bound(
        comps,
        task_pools=task_pools,
        device_pools=device_pools,
        rel_tol=rel_tol,
        upper=upper,
        time_limit_s=time_limit_s,
    ).value


def _greedy_makespan(proc: FloatArray, queue: FloatArray, lanes: FloatArray) -> float:
    """Makespan bound of the schedule that puts every task on its fastest device: the LP is
    feasible there (pooling only lowers processing times)."""
    best = np.argmin(proc, axis=1)
    times = proc[np.arange(proc.shape[0]), best]
    load = np.bincount(best, weights=times, minlength=proc.shape[1])
    longest = np.zeros(proc.shape[1])
    np.maximum.at(longest, best, times)
    used = load > 0
    per_device = queue[used] + np.maximum(load[used] / np.maximum(lanes[used], 1.0), longest[used])
    return float(per_device.max()) * (1.0 + 1e-9)


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
