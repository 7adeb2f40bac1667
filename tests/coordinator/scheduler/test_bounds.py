from __future__ import annotations

import numpy as np
import pytest

from coordinator.scheduler import (
    CostModel,
    CostWeights,
    DeviceState,
    TaskSpec,
    ThroughputEstimator,
    makespan_lower_bound,
    plan,
)
from coordinator.scheduler.bounds import lp_makespan_bound, simple_makespan_bound
from tests.coordinator.scheduler.factories import random_fleet, random_tasks


@pytest.mark.parametrize("seed", range(4))
def test_lower_bound_is_below_every_plan(seed: int) -> None:
    rng = np.random.default_rng(seed)
    fleet, tasks = random_fleet(rng, 10), random_tasks(rng, 60)
    model = CostModel(CostWeights(), ThroughputEstimator())
    comps = model.components(tasks, fleet)
    simple = simple_makespan_bound(comps)
    lp = lp_makespan_bound(comps, task_pools=20, device_pools=5)
    tight = makespan_lower_bound(tasks, fleet, model)
    assert simple <= lp * (1 + 1e-9)
    assert simple <= tight * (1 + 1e-9)
    for method in ("exact", "fast", "random", "round_robin"):
        result = plan(tasks, fleet, model, method=method, time_budget_s=0.1)
        assert tight <= result.makespan * (1 + 1e-9)
        assert lp <= result.makespan * (1 + 1e-9)


def test_bound_is_tight_on_identical_work() -> None:
    model = CostModel(CostWeights(), ThroughputEstimator())
    devices = [DeviceState(device_id=f"d{i}", fp32_gflops=10.0, rtt_s=0.0) for i in range(4)]
    tasks = [TaskSpec(task_id=f"t{j}", kind="k", demand_gops=10.0) for j in range(8)]
    # 8 one-second tasks on 4 lanes: 2 s, met by the plan.
    assert makespan_lower_bound(tasks, devices, model) == pytest.approx(2.0, rel=5e-3)
    assert makespan_lower_bound(tasks, devices, model, lp=False) == pytest.approx(2.0)
    assert plan(tasks, devices, model).makespan == pytest.approx(2.0)


def test_bound_of_nothing_is_zero() -> None:
    model = CostModel(CostWeights(), ThroughputEstimator())
    dev = DeviceState(device_id="d", online=False)
    assert makespan_lower_bound([TaskSpec(task_id="t", kind="k")], [dev], model) == 0.0
