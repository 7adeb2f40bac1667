"""The rollout planning kernel: phases, limits, abort, timeouts, approval, offline devices."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest

from lepton.coordinator.rollouts.engine import (
    DeviceView,
    Phase,
    Policy,
    RolloutView,
    decide,
    order,
)

CANARY_THEN_ALL = (Phase(count=2), Phase(percent=50.0), Phase(percent=100.0))


def policy(**kw: object) -> Policy:
    base: dict[str, object] = {"phases": CANARY_THEN_ALL, "max_in_flight": 100}
    base.update(kw)
    return Policy(**base)  # type: ignore[arg-type]


def fleet(n: int, **kw: object) -> list[DeviceView]:
    return [DeviceView(id=f"d{i:03d}", seq=i, state="pending", **kw) for i in range(n)]  # type: ignore[arg-type]


def apply(
    devices: list[DeviceView], ids: tuple[str, ...], state: str, now: float = 0.0
) -> list[DeviceView]:
    chosen = set(ids)
    return [
        replace(d, state=state, started_at=now) if d.id in chosen else d  # type: ignore[arg-type]
        for d in devices
    ]


RUNNING = RolloutView(state="running")


def test_canary_starts_first_then_grows() -> None:
    devices = fleet(10)
    d = decide(policy(), RUNNING, devices, 0.0)
    assert d.state == "running"
    assert d.phase == 0
    assert d.start == ("d000", "d001")
    devices = apply(devices, d.start, "succeeded")
    d = decide(policy(), RUNNING, devices, 1.0)
    assert d.phase == 1
    assert d.start == ("d002", "d003", "d004")
    devices = apply(devices, d.start, "succeeded")
    d = decide(policy(), replace(RUNNING, phase=1), devices, 2.0)
    assert d.phase == 2
    assert len(d.start) == 5
    devices = apply(devices, d.start, "succeeded")
    assert decide(policy(), replace(RUNNING, phase=2), devices, 3.0).state == "completed"


def test_canary_failure_aborts_after_abort_min() -> None:
    p = policy(phases=(Phase(count=5), Phase(percent=100.0)), abort_min_finished=3)
    devices = fleet(20)
    devices = apply(devices, ("d000", "d001"), "failed")
    devices = apply(devices, ("d002", "d003", "d004"), "dispatched")
    d = decide(p, RUNNING, devices, 0.0)
    assert d.state == "running"
    assert d.start == ()
    devices = apply(devices, ("d002",), "succeeded")
    d = decide(p, RUNNING, devices, 1.0)
    assert d.state == "aborted"
    assert "2 of 3" in d.reason
    # Every pending device is skipped; nothing more starts.
    assert {k for k, (s, _) in d.marks.items() if s == "skipped"} == {
        f"d{i:03d}" for i in range(5, 20)
    }


def test_phase_below_success_threshold_fails_and_reverts_when_asked() -> None:
    p = policy(
        phases=(Phase(count=4), Phase(percent=100.0)),
        success_threshold=1.0,
        abort_failure_share=1.0,
        revert_on_abort=True,
    )
    devices = apply(fleet(8), ("d000", "d001", "d002"), "succeeded")
    devices = apply(devices, ("d003",), "failed")
    d = decide(p, RUNNING, devices, 0.0)
    assert d.state == "failed"
    assert "3 of 4" in d.reason
    assert set(d.revert) == {"d000", "d001", "d002"}
    assert d.revert_all


def test_stuck_device_times_out_and_does_not_block() -> None:
    p = policy(
        phases=(Phase(count=2), Phase(percent=100.0)),
        device_timeout_s=60.0,
        success_threshold=0.5,
        abort_failure_share=1.0,
    )
    devices = apply(fleet(4), ("d000",), "succeeded")
    devices = apply(devices, ("d001",), "dispatched", now=0.0)
    d = decide(p, RUNNING, devices, 30.0)
    assert d.start == ()
    assert d.wake_at == 60.0
    d = decide(p, RUNNING, devices, 60.0)
    assert d.marks["d001"][0] == "timed_out"
    assert d.phase == 1
    assert d.start == ("d002", "d003")


def test_in_flight_and_rate_limits() -> None:
    p = policy(phases=(Phase(percent=100.0),), max_in_flight=3, rate_count=5, rate_window_s=60.0)
    devices = fleet(20)
    d = decide(p, RUNNING, devices, 0.0)
    assert len(d.start) == 3
    devices = apply(devices, d.start, "succeeded", now=0.0)
    d = decide(p, RUNNING, devices, 1.0)
    assert len(d.start) == 2  # 3 started in the window, rate 5
    devices = apply(devices, d.start, "dispatched", now=1.0)
    d = decide(p, RUNNING, devices, 2.0)
    assert d.start == ()
    assert d.wake_at == 60.0
    d = decide(p, RUNNING, devices, 60.0)
    assert len(d.start) == 1  # 3 left the window; 2 in flight of 3


def test_approval_gate_holds_until_approved() -> None:
    p = policy(phases=(Phase(count=1), Phase(percent=100.0, approval=True)))
    devices = apply(fleet(3), ("d000",), "succeeded")
    d = decide(p, RUNNING, devices, 0.0)
    assert d.state == "waiting_approval"
    assert d.phase == 1
    assert d.start == ()
    held = RolloutView(state="waiting_approval", phase=1)
    assert decide(p, held, devices, 99.0).state == "waiting_approval"
    d = decide(p, replace(held, approved=frozenset({1})), devices, 100.0)
    assert d.state == "running"
    assert d.start == ("d001", "d002")


def test_paused_starts_nothing_but_still_times_out() -> None:
    p = policy(device_timeout_s=10.0)
    devices = apply(fleet(5), ("d000",), "dispatched", now=0.0)
    d = decide(p, RolloutView(state="paused"), devices, 11.0)
    assert d.state == "paused"
    assert d.start == ()
    assert d.marks["d000"][0] == "timed_out"


def test_offline_wait_does_not_hold_a_phase_and_is_skipped_at_the_end() -> None:
    p = policy(phases=(Phase(count=2), Phase(percent=100.0)))
    devices = fleet(4)
    devices[0] = replace(devices[0], online=False)
    d = decide(p, RUNNING, devices, 0.0)
    assert d.start == ("d001",)
    devices = apply(devices, ("d001",), "succeeded")
    d = decide(p, RUNNING, devices, 1.0)
    assert d.phase == 1
    assert d.start == ("d002", "d003")
    # It comes back while the rollout runs: it is started with the rest.
    back = [replace(x, online=True) if x.id == "d000" else x for x in devices]
    assert "d000" in decide(p, replace(RUNNING, phase=1), back, 2.0).start
    devices = apply(devices, ("d002", "d003"), "succeeded")
    d = decide(p, replace(RUNNING, phase=1), devices, 3.0)
    assert d.state == "completed"
    assert d.marks["d000"][0] == "skipped"


def test_offline_skip_policy_skips_at_its_turn() -> None:
    p = policy(phases=(Phase(count=2), Phase(percent=100.0)), offline="skip")
    devices = fleet(4)
    devices[1] = replace(devices[1], online=False)
    d = decide(p, RUNNING, devices, 0.0)
    assert d.marks["d001"][0] == "skipped"
    assert d.start == ("d000",)


def test_late_joiner_is_started_in_the_current_phase() -> None:
    p = policy(phases=(Phase(count=1), Phase(percent=100.0)))
    devices = apply(fleet(3), ("d000", "d001", "d002"), "succeeded")
    devices.append(DeviceView(id="late", seq=3, state="pending"))
    d = decide(p, replace(RUNNING, phase=1), devices, 0.0)
    assert d.state == "running"
    assert d.start == ("late",)


def test_aborted_with_revert_reverts_devices_that_succeed_later() -> None:
    aborted = RolloutView(state="aborted", revert=True)
    devices = apply(fleet(3), ("d000",), "succeeded")
    devices = apply(devices, ("d001",), "dispatched")
    d = decide(policy(), aborted, devices, 0.0)
    assert d.revert == ("d000",)
    assert d.marks["d002"][0] == "skipped"
    assert "d001" not in d.marks
    devices = apply(devices, ("d001",), "succeeded")
    assert decide(policy(), aborted, devices, 1.0).revert == ("d000", "d001")


def test_order_is_deterministic_and_spreads_classes() -> None:
    devices = [(f"a{i}", "big") for i in range(50)] + [(f"b{i}", "small") for i in range(10)]
    first = order("r1", devices)
    assert first == order("r1", list(reversed(devices)))
    assert first != order("r2", devices)
    assert sorted(first) == sorted(i for i, _ in devices)
    canary = Counter(i[0] for i in first[:6])
    assert canary["b"] >= 1
    assert canary["a"] >= 4


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"phases": ()}, "at least one phase"),
        ({"phases": (Phase(count=3),)}, "100%"),
        ({"max_in_flight": 0}, "max_in_flight"),
        ({"success_threshold": 1.5}, "success_threshold"),
    ],
)
def test_policy_bounds(kw: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        policy(**kw)


def test_phase_bounds() -> None:
    with pytest.raises(ValueError, match="count or a percent"):
        Phase()
    with pytest.raises(ValueError, match="count or a percent"):
        Phase(count=1, percent=5.0)
    with pytest.raises(ValueError, match="percent"):
        Phase(percent=0.0)
    assert Phase(percent=10.0).target(7) == 1
    assert Phase(percent=50.0).target(7) == 4
    assert Phase(count=5).target(3) == 3
