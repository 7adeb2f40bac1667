from __future__ import annotations

import math

import numpy as np
import pytest

from lepton.coordinator.scheduler import (
    REASONS,
    CostModel,
    CostWeights,
    DeviceState,
    TaskSpec,
    ThroughputEstimator,
)
from lepton.protocol.messages import Battery, Bench, CapacityReport, Cpu, Memory, Slots, Thermal
from tests.coordinator.scheduler.factories import GIB, random_fleet, random_tasks

DEV = DeviceState(
    device_id="pi",
    fp32_gflops=10.0,
    int8_gops=40.0,
    bandwidth_bps=8e6,
    rtt_s=0.1,
    mem_available=4 * GIB,
    runtimes=frozenset({"onnxruntime"}),
)
TASK = TaskSpec(task_id="t", kind="infer", demand_gops=5.0, input_bytes=1_000_000)


def test_terms_by_hand(model: CostModel) -> None:
    t = model.terms(TASK, DEV)
    assert t.compute_s == pytest.approx(0.5)  # 5 GFLOP / 10 GFLOPS
    assert t.transfer_s == pytest.approx(1.0)  # 8e6 bits / 8e6 bit/s
    assert t.rtt_s == pytest.approx(0.1)
    assert t.queue_s == 0.0
    assert t.total == pytest.approx(1.6)
    assert t.completion_s == pytest.approx(1.6)
    assert t.rate_gops == pytest.approx(10.0)


def test_int8_uses_int8_figure_and_lanes_share_the_device(model: CostModel) -> None:
    task = TaskSpec(task_id="t", kind="infer", precision="int8", demand_gops=8.0)
    assert model.terms(task, DEV).compute_s == pytest.approx(0.2)
    two_lanes = DeviceState(device_id="x", int8_gops=40.0, fp32_gflops=10.0, slots_total=2)
    assert model.terms(task, two_lanes).compute_s == pytest.approx(0.4)


def test_fallbacks_without_bench_figures() -> None:
    est = ThroughputEstimator(int8_speedup=2.0, fallback_gops_per_core=0.5)
    model = CostModel(CostWeights(), est)
    no_int8 = DeviceState(device_id="a", fp32_gflops=10.0)
    task = TaskSpec(task_id="t", kind="k", precision="int8", demand_gops=20.0)
    assert model.terms(task, no_int8).compute_s == pytest.approx(1.0)
    no_bench = DeviceState(device_id="b", cpu_count=4)
    assert model.terms(TASK, no_bench).compute_s == pytest.approx(5.0 / 2.0)


def test_queue_wait(model: CostModel) -> None:
    queued = DeviceState(device_id="q", fp32_gflops=10, queued=3, slots_total=2)
    assert model.terms(TASK, queued).queue_s == pytest.approx(1.5)  # 3 tasks x 1 s / 2 lanes
    full = DeviceState(device_id="f", fp32_gflops=10, slots_total=2, slots_busy=2, queued=2)
    assert model.terms(TASK, full).queue_s == pytest.approx(1.0 + 0.5)
    known = DeviceState(device_id="k", fp32_gflops=10, slots_total=2, backlog_s=4.0)
    assert model.terms(TASK, known).queue_s == pytest.approx(2.0)
    assert model.terms(TASK, known, queue_s=7.0).queue_s == 7.0


def test_energy_and_battery_terms_are_weighted() -> None:
    weights = CostWeights(energy=0.1, battery=0.2, radio_power_w=1.0)
    model = CostModel(weights, ThroughputEstimator())
    dev = DeviceState(
        device_id="b",
        fp32_gflops=10.0,
        bandwidth_bps=8e6,
        rtt_s=0.1,
        power_w=10.0,
        battery_percent=50.0,
        plugged=False,
    )
    t = model.terms(TASK, dev)
    assert t.energy == pytest.approx(0.5 * 10 + 1.0 * 1.0)
    assert t.battery == pytest.approx((0.5 + 1.0) * 100 / 50)
    assert t.total == pytest.approx(1.6 + 0.1 * 6.0 + 0.2 * 3.0)
    plugged = DeviceState(
        device_id="p",
        fp32_gflops=10.0,
        bandwidth_bps=8e6,
        rtt_s=0.1,
        power_w=10.0,
        battery_percent=50.0,
        plugged=True,
    )
    assert model.terms(TASK, plugged).battery == 0.0
    low = DeviceState(
        device_id="l",
        fp32_gflops=10.0,
        bandwidth_bps=8e6,
        rtt_s=0.1,
        power_w=10.0,
        battery_percent=25.0,
        plugged=False,
    )
    assert model.terms(TASK, low).battery == pytest.approx(2 * t.battery)


def test_power_by_class() -> None:
    model = CostModel(
        CostWeights(power_w_by_class={"jetson": 15.0}, default_power_w=3.0), ThroughputEstimator()
    )
    assert model.power_w(DeviceState(device_id="a", device_class="jetson")) == 15.0
    assert model.power_w(DeviceState(device_id="b", device_class="pi")) == 3.0
    assert model.power_w(DeviceState(device_id="c", power_w=7.0)) == 7.0


@pytest.mark.parametrize(
    ("task_changes", "device_changes", "reason"),
    [
        ({}, {"online": False}, "offline"),
        ({"device_id": "other"}, {}, "pinned"),
        ({}, {"slots_total": 0}, "slots"),
        ({"runtime": "tflite"}, {}, "runtime"),
        ({"accelerator": "cuda"}, {}, "accelerator"),
        ({"data_source": "ward-7"}, {}, "data"),
        ({"memory_bytes": 5 * GIB}, {}, "memory"),
        ({}, {"throttled": True}, "thermal"),
        ({}, {"temperature_c": 85.0}, "thermal"),
        ({}, {"battery_percent": 15.0, "plugged": False}, "battery"),
        ({}, {"battery_percent": 15.0}, "battery"),  # unknown plug state counts as unplugged
        ({"min_battery": 60.0}, {"battery_percent": 50.0, "plugged": False}, "battery"),
    ],
)
def test_every_hard_filter(
    model: CostModel,
    task_changes: dict[str, object],
    device_changes: dict[str, object],
    reason: str,
) -> None:
    task = TaskSpec(**{"task_id": "t", "kind": "infer", **task_changes})  # type: ignore[arg-type]
    dev = DeviceState(**{**_fields(DEV), **device_changes})  # type: ignore[arg-type]
    assert model.feasible(TASK, DEV) is None
    assert model.feasible(task, dev) == reason
    cost, reasons = model.matrix([task], [dev])
    assert math.isinf(cost[0, 0])
    assert reasons[0, 0] == reason
    assert REASONS[int(reasons.codes()[0, 0]) - 1] == reason


@pytest.mark.parametrize(
    ("task_changes", "device_changes"),
    [
        ({"device_id": "pi"}, {}),
        ({"runtime": "onnxruntime"}, {}),
        ({"data_source": "ward-7"}, {"data_sources": frozenset({"ward-7"})}),
        ({"accelerator": "cuda"}, {"accelerators": frozenset({"cuda"})}),
        ({"memory_bytes": 4 * GIB}, {}),
        ({}, {"battery_percent": 15.0, "plugged": True}),
        ({"min_battery": 10.0}, {"battery_percent": 15.0, "plugged": False}),
        ({}, {"temperature_c": 79.9}),
    ],
)
def test_filters_let_matching_pairs_through(
    model: CostModel, task_changes: dict[str, object], device_changes: dict[str, object]
) -> None:
    task = TaskSpec(**{"task_id": "t", "kind": "infer", **task_changes})  # type: ignore[arg-type]
    dev = DeviceState(**{**_fields(DEV), **device_changes})  # type: ignore[arg-type]
    assert model.feasible(task, dev) is None
    assert math.isfinite(model.matrix([task], [dev])[0][0, 0])


def test_matrix_agrees_with_scalar_terms_and_filters() -> None:
    rng = np.random.default_rng(3)
    fleet, tasks = random_fleet(rng, 25), random_tasks(rng, 60)
    weights = CostWeights(energy=0.05, battery=0.1)
    model = CostModel(weights, ThroughputEstimator())
    cost, reasons = model.matrix(tasks, fleet)
    codes = reasons.codes()
    assert cost.shape == (60, 25)
    for j, task in enumerate(tasks):
        for i, dev in enumerate(fleet):
            why = model.feasible(task, dev)
            assert reasons[j, i] == why
            assert (REASONS[codes[j, i] - 1] if codes[j, i] else None) == why
            if why is None:
                assert cost[j, i] == pytest.approx(model.terms(task, dev).total, rel=1e-12)
            else:
                assert math.isinf(cost[j, i])
    sub = reasons.codes([5, 2])
    assert np.array_equal(sub, codes[[5, 2]])
    assert sum(reasons.summary(0).values()) == int((codes[0] > 0).sum())


def test_components_position_costs() -> None:
    model = CostModel(CostWeights(time=2.0), ThroughputEstimator())
    dev = DeviceState(device_id="q", fp32_gflops=10.0, queued=1, rtt_s=0.0, bandwidth_bps=1e9)
    comps = model.components([TASK.__class__(task_id="a", kind="k", demand_gops=10.0)], [dev])
    p, r = comps.position_costs()
    assert p[0, 0] == pytest.approx(2.0)  # 1 s of processing, weight 2
    assert r[0] == pytest.approx(2.0)  # 1 s of queue, weight 2
    assert comps.standalone()[0, 0] == pytest.approx(4.0)


def test_from_capacity_and_overrides() -> None:
    report = CapacityReport(
        device_class="rpi5",
        cpu=Cpu(count=4),
        memory=Memory(total=8 * GIB, available=6 * GIB),
        thermal=Thermal(temperature_c=55.0, throttled=False),
        battery=Battery(percent=80.0, plugged=True),
        runtimes=["onnxruntime", "tflite"],
        accelerators=[],
        bench=Bench(fp32_gflops=30.0, int8_gops=100.0),
        slots=Slots(total=2, busy=1, queued=3),
        tags=["lab"],
    )
    dev = DeviceState.from_capacity("pi5-1", report, bandwidth_bps=50e6, online=False)
    assert dev.device_id == "pi5-1"
    assert dev.device_class == "rpi5"
    assert dev.cpu_count == 4
    assert dev.mem_available == 6 * GIB
    assert dev.fp32_gflops == 30.0
    assert dev.int8_gops == 100.0
    assert dev.runtimes == frozenset({"onnxruntime", "tflite"})
    assert (dev.slots_total, dev.slots_busy, dev.queued) == (2, 1, 3)
    assert (dev.battery_percent, dev.plugged) == (80.0, True)
    assert dev.temperature_c == 55.0
    assert dev.tags == frozenset({"lab"})
    assert dev.bandwidth_bps == 50e6
    assert dev.online is False
    assert dev.lanes == 1
    with pytest.raises(TypeError):
        DeviceState.from_capacity("x", report, no_such_field=1)


def test_invalid_values_are_rejected() -> None:
    with pytest.raises(ValueError, match="demand"):
        TaskSpec(task_id="t", kind="k", demand_gops=float("nan"))
    with pytest.raises(ValueError, match="precision"):
        TaskSpec(task_id="t", kind="k", precision="fp16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bandwidth"):
        DeviceState(device_id="d", bandwidth_bps=0)
    with pytest.raises(ValueError, match="weights"):
        CostWeights(energy=-1)


def _fields(dev: DeviceState) -> dict[str, object]:
    return {name: getattr(dev, name) for name in dev.__dataclass_fields__}
