from __future__ import annotations

import json
import math

import pytest

from lepton.coordinator.scheduler import DeviceState, ThroughputEstimator

PI = DeviceState(device_id="pi-1", device_class="rpi4", fp32_gflops=12.0, int8_gops=24.0)


def test_prior_is_the_bench_figure() -> None:
    est = ThroughputEstimator()
    assert est.rate(PI, "cnn", "fp32") == pytest.approx(12.0)
    assert est.rate(PI, "cnn", "int8") == pytest.approx(24.0)
    assert est.observations("pi-1", "cnn", "fp32") == 0


def test_observations_move_the_estimate_toward_them() -> None:
    est = ThroughputEstimator(alpha=0.3)
    prior = est.rate(PI, "cnn", "fp32")
    observed = 3.0  # the model reaches a quarter of the bench figure
    last = prior
    for _ in range(12):
        est.observe("pi-1", "cnn", "fp32", demand_gops=6.0, seconds=6.0 / observed)
        now = est.rate(PI, "cnn", "fp32")
        assert observed <= now < last
        last = now
    assert last == pytest.approx(observed, rel=0.02)
    assert est.observations("pi-1", "cnn", "fp32") == 12
    # Other model classes and precisions keep their own estimates.
    assert est.rate(PI, "cnn", "int8") == pytest.approx(24.0)
    assert est.rate(PI, "rnn", "fp32") == pytest.approx(12.0)


def test_first_observation_weighs_half_then_alpha() -> None:
    est = ThroughputEstimator(alpha=0.3, prior_weight=1.0)
    est.rate(PI, "cnn", "fp32")
    est.observe("pi-1", "cnn", "fp32", demand_gops=3.0, seconds=1.0)
    # geometric mean of prior 12 and observation 3
    assert est.rate(PI, "cnn", "fp32") == pytest.approx(6.0)
    for _ in range(200):
        est.observe("pi-1", "cnn", "fp32", demand_gops=3.0, seconds=1.0)
    before = est.rate(PI, "cnn", "fp32")
    est.observe("pi-1", "cnn", "fp32", demand_gops=6.0, seconds=1.0)
    after = est.rate(PI, "cnn", "fp32")
    assert math.log(after / before) == pytest.approx(0.3 * math.log(6.0 / before))


def test_class_efficiency_seeds_unseen_devices_of_that_class() -> None:
    # Without the peer median a claim above the class's other claims is taken as is.
    est = ThroughputEstimator(peer_median=False)
    est.rate(PI, "cnn", "fp32")
    for _ in range(10):
        est.observe("pi-1", "cnn", "fp32", demand_gops=6.0, seconds=1.0)  # half the bench
    other = DeviceState(device_id="pi-2", device_class="rpi4", fp32_gflops=20.0)
    assert est.rate(other, "cnn", "fp32") == pytest.approx(10.0, rel=0.05)
    unknown_class = DeviceState(device_id="x", device_class="x86", fp32_gflops=100.0)
    assert est.rate(unknown_class, "cnn", "fp32") == pytest.approx(50.0, rel=0.05)


def test_observe_without_a_prior_takes_the_observation() -> None:
    est = ThroughputEstimator()
    est.observe("new", "cnn", "fp32", demand_gops=10.0, seconds=2.0)
    dev = DeviceState(device_id="new", fp32_gflops=100.0)
    assert est.rate(dev, "cnn", "fp32") == pytest.approx(5.0)
    est2 = ThroughputEstimator()
    est2.observe("new", "cnn", "fp32", demand_gops=10.0, seconds=2.0, device=dev)
    assert est2.rate(dev, "cnn", "fp32") == pytest.approx(math.sqrt(100.0 * 5.0))


def test_bad_observations() -> None:
    est = ThroughputEstimator()
    with pytest.raises(ValueError, match="finite"):
        est.observe("a", "cnn", "fp32", demand_gops=float("nan"), seconds=1.0)
    with pytest.raises(ValueError, match=">= 0"):
        est.observe("a", "cnn", "fp32", demand_gops=1.0, seconds=-1.0)
    est.observe("a", "cnn", "fp32", demand_gops=0.0, seconds=1.0)  # nothing to learn
    assert est.observations("a", "cnn", "fp32") == 0
    est.observe("a", "cnn", "fp32", demand_gops=1.0, seconds=0.0)  # clamped, not a crash
    assert est.observations("a", "cnn", "fp32") == 1
    with pytest.raises(ValueError, match="alpha"):
        ThroughputEstimator(alpha=0.0)


def test_snapshot_round_trip_and_forget() -> None:
    est = ThroughputEstimator()
    est.rate(PI, "cnn", "int8")
    for s in (1.0, 2.0, 1.5):
        est.observe("pi-1", "cnn", "int8", demand_gops=10.0, seconds=s)
    snap = json.loads(json.dumps(est.snapshot()))
    again = ThroughputEstimator()
    again.load(snap)
    assert again.rate(PI, "cnn", "int8") == pytest.approx(est.rate(PI, "cnn", "int8"))
    assert again.observations("pi-1", "cnn", "int8") == 3
    fresh = DeviceState(device_id="pi-9", device_class="rpi4", fp32_gflops=12.0, int8_gops=24.0)
    assert again.rate(fresh, "cnn", "int8") == pytest.approx(est.rate(fresh, "cnn", "int8"))
    again.forget("pi-1")
    assert again.observations("pi-1", "cnn", "int8") == 0
    with pytest.raises(ValueError, match="version"):
        again.load({"version": 99})


def test_snapshot_keeps_per_lane_bench_of_multi_slot_devices() -> None:
    est = ThroughputEstimator()
    jetson = DeviceState(device_id="j", device_class="orin", fp32_gflops=600.0, slots_total=2)
    est.rate(jetson, "cnn", "fp32")
    again = ThroughputEstimator()
    again.load(est.snapshot())
    again.observe("j", "cnn", "fp32", demand_gops=150.0, seconds=1.0)  # half the lane's 300
    other = DeviceState(device_id="k", device_class="orin", fp32_gflops=600.0, slots_total=2)
    assert again.rate(other, "cnn", "fp32") == pytest.approx(150.0)
