"""Plan a batch: which device runs which task, at minimum total cost.

With the default weights the cost is the total expected completion time of the batch
(R||sum C_j with lanes). ``method``:

* ``exact``: the positional assignment problem solved optimally
  (:mod:`lepton.coordinator.scheduler.exact`), whatever it costs;
* ``fast``: backward greedy, then exact re-solves of random device groups until the time
  budget runs out (:mod:`lepton.coordinator.scheduler.fast`);
* ``auto``: ``exact`` when the pruned problem is small enough to solve within the budget,
  else ``fast``;
* ``random``, ``round_robin``: the baselines of :mod:`lepton.coordinator.scheduler.baselines`.

Every method chooses only among feasible devices; a task with none is reported in
``Plan.unassigned`` with the filters that removed each device.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

import numpy as np
import numpy.typing as npt

from lepton.coordinator.scheduler import exact, fast
from lepton.coordinator.scheduler.baselines import random_assign, round_robin
from lepton.coordinator.scheduler.costmodel import CostComponents, CostModel
from lepton.coordinator.scheduler.explain import Candidate, Explanation
from lepton.coordinator.scheduler.filters import summarize
from lepton.coordinator.scheduler.schedule import Schedule, evaluate
from lepton.coordinator.scheduler.types import DeviceState, TaskSpec

log = logging.getLogger(__name__)

Method = Literal["auto", "exact", "fast", "random", "round_robin"]
METHODS: Final[tuple[Method, ...]] = ("auto", "exact", "fast", "random", "round_robin")

# linear_sum_assignment on the positional matrix (n rows, C >= n columns) takes about
# n * n * C / EXACT_SPEED seconds on one core of the bench machine (its structured costs
# are far slower than random ones), and usually two rounds of column generation. ``auto``
# picks the exact solver only when that estimate fits in what is left of the budget.
EXACT_SPEED: Final = 4e8
EXACT_ROUNDS: Final = 2
FINISH_S: Final = 0.01
FINISH_PER_TASK_S: Final = 6e-6

IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class _Context:
    model: CostModel
    tasks: tuple[TaskSpec, ...]
    devices: tuple[DeviceState, ...]
    task_index: dict[str, int]
    schedule: Schedule
    planned_tasks: IntArray
    planned_busy: npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class Plan:
    """The outcome of :func:`plan`.

    ``objective`` is the total expected completion time of the assigned tasks (seconds from
    now) and ``makespan`` the latest of them; ``cost`` the weighted total the solver
    minimised (equal to ``objective`` with the default weights). ``expected_start`` and
    ``expected_completion`` give each assigned task's times, and ``order`` the task ids by
    expected start: the order to dispatch them in.
    """

    assignments: dict[str, str]
    unassigned: dict[str, str]
    method: str
    objective: float
    makespan: float
    solve_s: float
    cost: float = 0.0
    expected_start: dict[str, float] = field(default_factory=dict)
    expected_completion: dict[str, float] = field(default_factory=dict)
    order: tuple[str, ...] = ()
    _context: _Context | None = field(default=None, repr=False, compare=False)

    def explain(self, task_id: str, *, top: int = 3, filtered: int = 10) -> Explanation:
        """The chosen device's cost terms next to the ``top`` next best feasible devices, and
        up to ``filtered`` filtered-out devices with their reasons (all counted).

        Terms are computed with the cost model's current estimates.
        """
        ctx = self._context
        if ctx is None or task_id not in ctx.task_index:
            raise KeyError(task_id)
        j = ctx.task_index[task_id]
        task = ctx.tasks[j]
        chosen_i = int(ctx.schedule.device[j])
        feasible: list[Candidate] = []
        out: list[Candidate] = []
        counts: dict[str, int] = {}
        for i, dev in enumerate(ctx.devices):
            reason = ctx.model.feasible(task, dev)
            if reason is not None:
                counts[reason] = counts.get(reason, 0) + 1
                if len(out) < filtered:
                    out.append(Candidate(device_id=dev.device_id, reason=reason))
                continue
            feasible.append(
                Candidate(
                    device_id=dev.device_id,
                    chosen=i == chosen_i,
                    terms=ctx.model.terms(task, dev),
                    planned_tasks=int(ctx.planned_tasks[i]),
                    planned_busy_s=float(ctx.planned_busy[i]),
                )
            )
        feasible.sort(key=lambda c: (not c.chosen, c.terms.total if c.terms else 0.0))
        keep = top + 1 if feasible and feasible[0].chosen else top
        assigned = chosen_i >= 0
        return Explanation(
            task_id=task_id,
            method=self.method,
            device_id=ctx.devices[chosen_i].device_id if assigned else None,
            reason=None if assigned else self.unassigned.get(task_id),
            expected_start_s=float(ctx.schedule.start[j]) if assigned else None,
            expected_completion_s=float(ctx.schedule.completion[j]) if assigned else None,
            candidates=tuple(feasible[:keep]),
            filtered=tuple(out),
            filtered_counts=dict(sorted(counts.items(), key=lambda kv: -kv[1])),
        )


def _unassigned_reasons(
    tasks: Sequence[TaskSpec], devices: Sequence[DeviceState], rows: IntArray, model: CostModel
) -> dict[str, str]:
    """Why each task in ``rows`` has no feasible device, in a form an operator can act on."""
    if len(rows) == 0:
        return {}
    if not devices:
        return {tasks[j].task_id: "no devices" for j in rows.tolist()}
    by_id = {d.device_id: d for d in devices}
    codes = model.reason_codes(tasks, devices, rows.tolist())
    out: dict[str, str] = {}
    for row, j in enumerate(rows.tolist()):
        task = tasks[j]
        if task.device_id is not None:
            pinned = by_id.get(task.device_id)
            if pinned is None:
                out[task.task_id] = f"pinned device {task.device_id} is not in the fleet"
            else:
                why = model.feasible(task, pinned)
                out[task.task_id] = f"pinned device {task.device_id}: {why}"
            continue
        summary = ", ".join(f"{name} x{c}" for name, c in summarize(codes[row]).items())
        out[task.task_id] = f"no feasible device: {summary}"
    return out


def _exact_fits(
    n: int,
    deadline: float,
    *,
    p: npt.NDArray[np.float64] | None = None,
    r: npt.NDArray[np.float64] | None = None,
    lanes: IntArray | None = None,
    incumbent: IntArray | None = None,
) -> bool:
    """Whether the exact solver is expected to finish by ``deadline``: first on the rows alone
    (columns >= rows), then, given the problem, on the columns it would start with."""
    cols = n
    if p is not None and r is not None and lanes is not None and incumbent is not None:
        cols = exact.column_count(p, r, lanes, incumbent)
    return bool(EXACT_ROUNDS * n * n * cols / EXACT_SPEED <= deadline - time.perf_counter())


def _solve(
    comps: CostComponents, rows: IntArray, method: Method, deadline: float, seed: int
) -> tuple[IntArray, str]:
    """Device of each of ``rows`` (all placeable) under ``method``, and the method used."""
    p, r = comps.position_costs()
    subset = None if len(rows) == comps.shape[0] else rows  # spare a copy of the matrix
    if method in ("random", "round_robin"):
        feasible = np.isfinite(p if subset is None else p[subset])
        if method == "random":
            return random_assign(feasible, np.random.default_rng(seed)), method
        return round_robin(feasible), method
    sub = fast.greedy(p, r, comps.lanes, rows=subset)
    if method == "exact" or (method == "auto" and _exact_fits(len(rows), deadline)):
        pe = p if subset is None else p[subset]
        re = r[subset] if subset is not None and r.ndim == 2 else r
        if method == "exact" or _exact_fits(
            len(rows), deadline, p=pe, r=re, lanes=comps.lanes, incumbent=sub
        ):
            return exact.solve(pe, re, comps.lanes, sub), "exact"
    sub, _ = fast.improve(
        p, r, comps.lanes, sub, rows=subset, deadline=deadline, rng=np.random.default_rng(seed)
    )
    return sub, "fast"


def plan(
    tasks: Sequence[TaskSpec],
    devices: Sequence[DeviceState],
    model: CostModel,
    *,
    method: Method = "auto",
    time_budget_s: float = 1.0,
    seed: int = 0,
) -> Plan:
    """Assign ``tasks`` to ``devices`` under ``model``; see the module doc for ``method``.

    ``time_budget_s`` bounds the whole call for ``auto`` and ``fast`` (building the cost
    matrix included); ``exact`` runs to the optimum however long it takes. ``seed`` makes the
    randomised parts (``fast``'s neighbourhoods, ``random``) reproducible.
    """
    t0 = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    tasks, devices = tuple(tasks), tuple(devices)
    task_index = {t.task_id: j for j, t in enumerate(tasks)}
    if len(task_index) != len(tasks):
        raise ValueError("duplicate task_id in batch")
    if len({d.device_id for d in devices}) != len(devices):
        raise ValueError("duplicate device_id in fleet")
    comps = model.components(tasks, devices)
    n = len(tasks)
    any_ok = comps.placeable
    rows = np.flatnonzero(any_ok)
    unassigned = _unassigned_reasons(tasks, devices, np.flatnonzero(~any_ok), model)
    assign = np.full(n, -1, dtype=np.int64)
    # Leave time to time the schedule and build the plan (a few microseconds per task) and
    # for the local search's last sub-problem to finish.
    deadline = t0 + time_budget_s - FINISH_S - FINISH_PER_TASK_S * n
    used: str = method if method != "auto" else "fast"
    if len(rows):
        assign[rows], used = _solve(comps, rows, method, deadline, seed)
    sched = evaluate(comps, assign)
    placed = np.flatnonzero(assign >= 0)
    m = len(devices)
    planned_tasks = np.bincount(assign[placed], minlength=m)
    planned_busy = np.bincount(
        assign[placed], weights=comps.proc[placed, assign[placed]], minlength=m
    ).astype(np.float64)
    ids = [tasks[j].task_id for j in placed.tolist()]
    chosen = [devices[i].device_id for i in assign[placed].tolist()]
    starts = sched.start[placed]
    assignments = dict(zip(ids, chosen, strict=True))
    expected_start = dict(zip(ids, starts.tolist(), strict=True))
    expected_completion = dict(zip(ids, sched.completion[placed].tolist(), strict=True))
    order = tuple(ids[k] for k in np.argsort(starts, kind="stable").tolist())
    solve_s = time.perf_counter() - t0
    log.debug("planned %d tasks on %d devices with %s in %.3fs", n, m, used, solve_s)
    return Plan(
        assignments=assignments,
        unassigned=unassigned,
        method=used,
        objective=sched.total_completion,
        makespan=sched.makespan,
        solve_s=solve_s,
        cost=sched.cost,
        expected_start=expected_start,
        expected_completion=expected_completion,
        order=order,
        _context=_Context(
            model=model,
            tasks=tasks,
            devices=devices,
            task_index=task_index,
            schedule=sched,
            planned_tasks=planned_tasks.astype(np.int64),
            planned_busy=planned_busy,
        ),
    )
