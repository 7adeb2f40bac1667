"""Finding 12 of the hardening review: a device's self-reported speed is not trusted.

A device that overstates its bench figure must not attract more of a batch than the same
device reporting honestly, neither before its tasks are observed nor after.
"""

from __future__ import annotations

import math

import pytest

from lepton.coordinator.scheduler import (
    ClaimLimits,
    CostModel,
    CostWeights,
    DeviceState,
    TaskSpec,
    ThroughputEstimator,
    plan,
)

PI4_GFLOPS = 6.0
PI5_GFLOPS = 16.0
BATCH = [
    TaskSpec(task_id=f"t{j}", kind="infer", model_class="cnn", demand_gops=6.0) for j in range(60)
]


def fleet(suspect_class: str, suspect_claim: float) -> list[DeviceState]:
    """Four honest Pi 4s, two honest Pi 5s and the suspect, which works at Pi 4 speed."""
    out = [
        DeviceState(device_id=f"pi4-{i}", device_class="rpi4", fp32_gflops=PI4_GFLOPS, rtt_s=0.0)
        for i in range(4)
    ]
    out += [
        DeviceState(device_id=f"pi5-{i}", device_class="rpi5", fp32_gflops=PI5_GFLOPS, rtt_s=0.0)
        for i in range(2)
    ]
    out.append(
        DeviceState(
            device_id="suspect",
            device_class=suspect_class,
            fp32_gflops=suspect_claim,
            rtt_s=0.0,
        )
    )
    return out


def suspect_share(devices: list[DeviceState], observed_tasks: int) -> int:
    """Tasks of :data:`BATCH` planned onto the suspect after ``observed_tasks`` finished tasks
    per device, each at the device's real speed."""
    est = ThroughputEstimator()
    est.rates(devices, "cnn", "fp32")
    for d in devices:
        real = PI5_GFLOPS if d.device_class == "rpi5" else PI4_GFLOPS
        for _ in range(observed_tasks):
            est.observe(d.device_id, "cnn", "fp32", 6.0, 6.0 / real, device=d)
    result = plan(BATCH, devices, CostModel(CostWeights(), est), method="exact")
    assert not result.unassigned
    return sum(1 for dev in result.assignments.values() if dev == "suspect")


@pytest.mark.parametrize("observed", [0, 1, 2, 3])
def test_a_lying_device_gets_no_more_than_its_honest_share(observed: int) -> None:
    honest = suspect_share(fleet("rpi4", PI4_GFLOPS), observed)
    lying = suspect_share(fleet("rpi4", 1e18), observed)
    assert honest >= 1  # the suspect is a useful device, not one filtered out
    assert lying <= honest


@pytest.mark.parametrize("suspect_class", ["x86_64", "no-such-class"])
def test_a_device_claiming_a_class_of_its_own_is_a_pi_after_a_few_tasks(
    suspect_class: str,
) -> None:
    # Alone in its class it has no peers to be compared with: before any observation only
    # the class limit holds it, and after three tasks it is scheduled at the speed it
    # delivers.
    honest = suspect_share(fleet("rpi4", PI4_GFLOPS), 3)
    lying = suspect_share(fleet(suspect_class, 1e18), 3)
    assert lying <= honest + 1
    est = ThroughputEstimator()
    liar = fleet(suspect_class, 1e18)[-1]
    assert est.rate(liar, "cnn", "fp32") == pytest.approx(4_000.0)  # the x86/fallback limit
    for _ in range(3):
        est.observe("suspect", "cnn", "fp32", 6.0, 1.0, device=liar)
    assert est.rate(liar, "cnn", "fp32") < 1.2 * PI4_GFLOPS


def test_claims_are_bounded_by_class_and_by_peers() -> None:
    est = ThroughputEstimator()
    alone = DeviceState(device_id="a", device_class="rpi4", fp32_gflops=1e18, int8_gops=1e18)
    assert est.bench_rate(alone, "fp32") == pytest.approx(30.0)  # rpi4 limit, no peers yet
    assert est.bench_rate(alone, "int8") == pytest.approx(60.0)
    peers = [DeviceState(device_id=f"p{i}", device_class="rpi4", fp32_gflops=6.0) for i in range(2)]
    est.rates([alone, *peers], "cnn", "fp32")
    assert est.bench_rate(alone, "fp32") == pytest.approx(6.0)  # the peers' median claim
    # An honest device at or below its peers keeps its own figure.
    assert est.bench_rate(peers[0], "fp32") == pytest.approx(6.0)


def test_claim_limits_are_configurable_per_class() -> None:
    weights = CostWeights(max_fp32_gflops_by_class={"gpu-box": 50_000.0}, max_fp32_gflops=100.0)
    est = ThroughputEstimator(limits=weights.claim_limits())
    box = DeviceState(device_id="g", device_class="gpu-box", fp32_gflops=40_000.0)
    odd = DeviceState(device_id="o", device_class="odd", fp32_gflops=40_000.0)
    assert est.bench_rate(box, "fp32") == pytest.approx(40_000.0)
    assert est.bench_rate(odd, "fp32") == pytest.approx(100.0)
    assert ClaimLimits().excess("rpi5", 81.0, None) == ["fp32_gflops"]
    assert ClaimLimits().excess("rpi5", 16.0, 36.0) == []
    with pytest.raises(ValueError, match="> 0"):
        ClaimLimits(fp32={"rpi4": math.nan})
    with pytest.raises(ValueError, match="> 0"):
        CostWeights(max_int8_gops=0.0)


def test_a_claim_changed_after_observations_does_not_move_the_estimate() -> None:
    est = ThroughputEstimator()
    pi = DeviceState(device_id="pi", device_class="rpi4", fp32_gflops=6.0)
    est.rate(pi, "cnn", "fp32")
    for _ in range(3):
        est.observe("pi", "cnn", "fp32", 6.0, 1.0, device=pi)
    before = est.rate(pi, "cnn", "fp32")
    boasting = DeviceState(device_id="pi", device_class="rpi4", fp32_gflops=30.0)
    assert est.rate(boasting, "cnn", "fp32") == pytest.approx(before)
