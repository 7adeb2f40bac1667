from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from lepton.coordinator.scheduler import (
    METHODS,
    CostModel,
    CostWeights,
    DeviceState,
    TaskSpec,
    ThroughputEstimator,
    exact,
    fast,
    plan,
)
from lepton.coordinator.scheduler.costmodel import CostComponents
from lepton.coordinator.scheduler.schedule import evaluate, positional_cost
from tests.coordinator.scheduler.factories import random_fleet, random_tasks


def brute_force(comps: CostComponents) -> float:
    """Minimum weighted cost over every assignment, each device running its tasks shortest
    first, each next task on the lane that frees up first."""
    n, m = comps.shape
    best = float("inf")
    options = [np.flatnonzero(np.isfinite(comps.proc[j])).tolist() for j in range(n)]
    for choice in itertools.product(*options):
        total = 0.0
        for i in range(m):
            mine = sorted(comps.proc[j, i] for j in range(n) if choice[j] == i)
            free = [float(comps.queue[i])] * int(comps.lanes[i])
            for p in mine:
                lane = min(range(len(free)), key=free.__getitem__)
                free[lane] += p
                total += comps.time_weight * free[lane]
        if comps.extra is not None:
            total += sum(comps.extra[j, choice[j]] for j in range(n))
        best = min(best, total)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_exact_equals_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    m = int(rng.integers(2, 4))
    n = int(rng.integers(2, 7 if m == 2 else 6))
    fleet = random_fleet(rng, m, filters=False)
    tasks = random_tasks(rng, n, filters=False)
    weights = CostWeights(energy=0.02, battery=0.1) if seed % 3 == 0 else CostWeights()
    model = CostModel(weights, ThroughputEstimator())
    comps = model.components(tasks, fleet)
    if seed % 2:  # knock out some pairs, keeping one device per task
        keep = rng.integers(m, size=n)
        for j in range(n):
            for i in range(m):
                if i != keep[j] and rng.random() < 0.4:
                    comps.proc[j, i] = np.inf
    p, r = comps.position_costs()
    start = fast.greedy(p, r, comps.lanes)
    got = exact.solve(p, r, comps.lanes, start)
    assert positional_cost(p, r, comps.lanes, got) == pytest.approx(brute_force(comps), rel=1e-9)
    assert evaluate(comps, got).cost == pytest.approx(brute_force(comps), rel=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_plan_exact_equals_brute_force_with_filters(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    fleet = random_fleet(rng, 3)
    tasks = random_tasks(rng, 5)
    model = CostModel(CostWeights(), ThroughputEstimator())
    result = plan(tasks, fleet, model, method="exact")
    comps = model.components(tasks, fleet)
    placeable = np.isfinite(comps.proc).any(axis=1)
    sub = CostComponents(comps.proc[placeable], comps.queue, comps.lanes, None, 1.0)
    assert result.cost == pytest.approx(brute_force(sub), rel=1e-9)
    assert len(result.assignments) == int(placeable.sum())


@pytest.mark.parametrize("seed", range(5))
def test_fast_within_stated_factor_of_exact(seed: int) -> None:
    """Stated factors: greedy alone within 25 %, greedy + local re-solves within 2 %."""
    rng = np.random.default_rng(200 + seed)
    fleet, tasks = random_fleet(rng, 8), random_tasks(rng, 60)
    model = CostModel(CostWeights(), ThroughputEstimator())
    opt = plan(tasks, fleet, model, method="exact")
    quick = plan(tasks, fleet, model, method="fast", time_budget_s=0.3, seed=seed)
    greedy = plan(tasks, fleet, model, method="fast", time_budget_s=0.0)
    assert opt.assignments.keys() == quick.assignments.keys() == greedy.assignments.keys()
    assert opt.objective <= quick.objective * (1 + 1e-9)
    assert quick.objective <= 1.02 * opt.objective
    assert greedy.objective <= 1.25 * opt.objective


@pytest.mark.parametrize("method", METHODS)
def test_plan_never_assigns_infeasible_pairs(method: str) -> None:
    rng = np.random.default_rng(7)
    fleet, tasks = random_fleet(rng, 12), random_tasks(rng, 80)
    model = CostModel(CostWeights(), ThroughputEstimator())
    result = plan(tasks, fleet, model, method=method, time_budget_s=0.2)  # type: ignore[arg-type]
    by_id = {d.device_id: d for d in fleet}
    for task in tasks:
        if task.task_id in result.assignments:
            assert model.feasible(task, by_id[result.assignments[task.task_id]]) is None
        else:
            assert all(model.feasible(task, d) is not None for d in fleet)
            assert task.task_id in result.unassigned
    assert len(result.assignments) + len(result.unassigned) == len(tasks)
    if method in ("random", "round_robin"):
        assert result.method == method
    else:
        assert result.method in ("exact", "fast")


def test_plan_timing_is_consistent() -> None:
    rng = np.random.default_rng(11)
    fleet, tasks = random_fleet(rng, 6, filters=False), random_tasks(rng, 30, filters=False)
    model = CostModel(CostWeights(), ThroughputEstimator())
    result = plan(tasks, fleet, model)
    done = result.expected_completion
    assert result.objective == pytest.approx(sum(done.values()))
    assert result.makespan == pytest.approx(max(done.values()))
    assert result.cost == pytest.approx(result.objective)
    assert sorted(result.order) == sorted(result.assignments)
    starts = [result.expected_start[t] for t in result.order]
    assert starts == sorted(starts)
    for tid, start in result.expected_start.items():
        assert 0 <= start <= done[tid]


def test_baselines_are_worse_than_the_optimum_on_a_skewed_fleet() -> None:
    fast_dev = [DeviceState(device_id=f"x{i}", fp32_gflops=400.0, slots_total=4) for i in range(2)]
    slow_dev = [DeviceState(device_id=f"p{i}", fp32_gflops=10.0) for i in range(8)]
    tasks = [TaskSpec(task_id=f"t{j}", kind="k", demand_gops=10.0) for j in range(60)]
    model = CostModel(CostWeights(), ThroughputEstimator())
    best = plan(tasks, fast_dev + slow_dev, model, method="exact")
    for method in ("random", "round_robin"):
        base = plan(tasks, fast_dev + slow_dev, model, method=method)
        assert base.objective > 2 * best.objective
        assert base.makespan > 2 * best.makespan


def test_round_robin_cycles_through_feasible_devices() -> None:
    devices = [DeviceState(device_id=f"d{i}", fp32_gflops=10.0) for i in range(3)]
    tasks = [TaskSpec(task_id=f"t{j}", kind="k") for j in range(6)]
    tasks[1] = TaskSpec(task_id="t1", kind="k", device_id="d0")
    model = CostModel(CostWeights(), ThroughputEstimator())
    got = plan(tasks, devices, model, method="round_robin").assignments
    assert [got[f"t{j}"] for j in range(6)] == ["d0", "d0", "d1", "d2", "d0", "d1"]


def test_edge_cases() -> None:
    model = CostModel(CostWeights(), ThroughputEstimator())
    dev = DeviceState(device_id="d", fp32_gflops=10.0)
    empty = plan([], [dev], model)
    assert empty.assignments == {}
    assert empty.objective == 0.0
    assert empty.makespan == 0.0
    task = TaskSpec(task_id="t", kind="k")
    none = plan([task], [], model)
    assert none.unassigned == {"t": "no devices"}
    pinned = plan([TaskSpec(task_id="p", kind="k", device_id="ghost")], [dev], model)
    assert pinned.unassigned["p"] == "pinned device ghost is not in the fleet"
    hot = DeviceState(device_id="h", fp32_gflops=10.0, throttled=True, mem_available=1 << 41)
    on_hot = plan([TaskSpec(task_id="q", kind="k", device_id="h")], [dev, hot], model)
    assert on_hot.unassigned["q"] == "pinned device h: thermal"
    big = TaskSpec(task_id="b", kind="k", memory_bytes=1 << 40)
    assert plan([big], [dev, hot], model).unassigned["b"] == (
        "no feasible device: memory x1, thermal x1"
    )
    with pytest.raises(ValueError, match="duplicate task_id"):
        plan([task, task], [dev], model)
    with pytest.raises(ValueError, match="duplicate device_id"):
        plan([task], [dev, dev], model)
    with pytest.raises(ValueError, match="unknown method"):
        plan([task], [dev], model, method="best")  # type: ignore[arg-type]


def test_lanes_run_in_parallel() -> None:
    model = CostModel(CostWeights(), ThroughputEstimator())
    dev = DeviceState(device_id="d", fp32_gflops=20.0, slots_total=2, rtt_s=0.0)
    tasks = [TaskSpec(task_id=f"t{j}", kind="k", demand_gops=10.0) for j in range(4)]
    result = plan(tasks, [dev], model, method="exact")
    # Per lane 10 GFLOPS: 1 s per task, two lanes, two tasks each.
    assert sorted(result.expected_completion.values()) == pytest.approx([1, 1, 2, 2])
    assert result.makespan == pytest.approx(2.0)


def test_explain_orders_candidates() -> None:
    rng = np.random.default_rng(5)
    fleet, tasks = random_fleet(rng, 15), random_tasks(rng, 40)
    model = CostModel(CostWeights(), ThroughputEstimator())
    result = plan(tasks, fleet, model)
    tid = next(iter(result.assignments))
    ex = result.explain(tid, top=3)
    assert ex.device_id == result.assignments[tid]
    assert ex.chosen is not None
    assert ex.chosen.device_id == ex.device_id
    assert ex.candidates[0].chosen
    rest = [c.terms.total for c in ex.candidates[1:] if c.terms is not None]
    assert rest == sorted(rest)
    assert len(ex.candidates) <= 4
    assert not any(c.chosen for c in ex.candidates[1:])
    assert all(c.reason is not None and c.terms is None for c in ex.filtered)
    n_feasible = sum(model.feasible(tasks[int(tid[1:])], d) is None for d in fleet)
    assert sum(ex.filtered_counts.values()) == len(fleet) - n_feasible
    assert ex.expected_start_s == pytest.approx(result.expected_start[tid])
    assert ex.expected_completion_s == pytest.approx(result.expected_completion[tid])
    json.dumps(ex.to_dict())
    text = ex.render()
    assert tid in text
    assert ex.device_id in text
    with pytest.raises(KeyError):
        result.explain("no-such-task")


def test_explain_an_unassigned_task() -> None:
    model = CostModel(CostWeights(), ThroughputEstimator())
    devices = [
        DeviceState(device_id="a", fp32_gflops=10.0, online=False),
        DeviceState(device_id="b", fp32_gflops=10.0),
    ]
    task = TaskSpec(task_id="t", kind="k", runtime="tensorrt")
    ex = plan([task], devices, model).explain("t")
    assert ex.device_id is None
    assert ex.chosen is None
    assert ex.reason == "no feasible device: offline x1, runtime x1"  # ties in check order
    assert ex.candidates == ()
    assert {c.device_id: c.reason for c in ex.filtered} == {"a": "offline", "b": "runtime"}
    assert "not assigned" in ex.render()


def test_side_costs_steer_the_choice() -> None:
    mains = DeviceState(device_id="mains", fp32_gflops=10.0, power_w=40.0, rtt_s=0.0)
    frugal = DeviceState(device_id="frugal", fp32_gflops=8.0, power_w=5.0, rtt_s=0.0)
    low = DeviceState(
        device_id="low", fp32_gflops=12.0, power_w=10.0, rtt_s=0.0, battery_percent=25.0
    )
    task = TaskSpec(task_id="t", kind="k", demand_gops=8.0)
    fleet = [mains, frugal, low]
    by_time = plan([task], fleet, CostModel(CostWeights(), ThroughputEstimator()))
    assert by_time.assignments == {"t": "low"}
    by_battery = plan([task], fleet, CostModel(CostWeights(battery=1.0), ThroughputEstimator()))
    assert by_battery.assignments == {"t": "mains"}
    energy_only = CostModel(CostWeights(time=0.0, energy=1.0), ThroughputEstimator())
    result = plan([task], fleet, energy_only)
    assert result.assignments == {"t": "frugal"}
    assert result.cost == pytest.approx(1.0 * 5.0)  # 1 s at 5 W
    assert result.objective == pytest.approx(1.0)
