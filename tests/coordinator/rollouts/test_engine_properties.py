"""Properties of the rollout kernel over simulated fleets (hypothesis): limits are never
exceeded, a failing canary aborts, stuck devices never block, late joiners join, an
approval gate holds."""

from __future__ import annotations

from dataclasses import dataclass, replace

from hypothesis import given, settings
from hypothesis import strategies as st

from lepton.coordinator.rollouts.engine import (
    ENDED,
    FAILURES,
    FINISHED,
    IN_FLIGHT,
    DeviceView,
    Phase,
    Policy,
    RolloutView,
    decide,
)

STEP_S = 5.0


@dataclass
class Sim:
    """A fleet whose devices each end one way (``fate``) some steps after they start."""

    policy: Policy
    devices: dict[str, DeviceView]
    fate: dict[str, tuple[str, int]]  # id -> (succeeded|failed|stuck, steps to finish)
    rollout: RolloutView
    now: float = 0.0
    starts: list[tuple[float, str]] | None = None

    def step(self) -> None:
        d = decide(self.policy, self.rollout, list(self.devices.values()), self.now)
        for device_id, (state, _reason) in d.marks.items():
            self.devices[device_id] = replace(self.devices[device_id], state=state)
        for device_id in d.start:
            assert self.devices[device_id].state == "pending"
            self.devices[device_id] = replace(
                self.devices[device_id], state="dispatched", started_at=self.now
            )
            assert self.starts is not None
            self.starts.append((self.now, device_id))
        for device_id in d.revert:
            self.devices[device_id] = replace(
                self.devices[device_id], state="reverting", started_at=self.now
            )
        self.rollout = replace(
            self.rollout, state=d.state, phase=d.phase, revert=self.rollout.revert or d.revert_all
        )
        self.check_limits()
        self.now += STEP_S
        for device_id, dev in list(self.devices.items()):
            if dev.started_at is None:
                continue
            fate, steps = self.fate[device_id]
            due = self.now >= dev.started_at + steps * STEP_S
            if dev.state in IN_FLIGHT and due and fate != "stuck":
                self.devices[device_id] = replace(dev, state=fate)  # type: ignore[arg-type]
            elif dev.state == "reverting" and due and fate != "stuck":
                self.devices[device_id] = replace(dev, state="reverted")

    def check_limits(self) -> None:
        in_flight = sum(d.state in IN_FLIGHT for d in self.devices.values())
        assert in_flight <= self.policy.max_in_flight
        if self.policy.rate_count:
            assert self.starts is not None
            window = [t for t, _ in self.starts if t > self.now - self.policy.rate_window_s]
            assert len(window) <= self.policy.rate_count


phases = st.lists(
    st.one_of(
        st.builds(Phase, count=st.integers(1, 30)),
        st.builds(Phase, percent=st.floats(1.0, 99.0)),
    ),
    max_size=3,
).map(lambda ps: (*ps, Phase(percent=100.0)))

policies = st.builds(
    Policy,
    phases=phases,
    rate_count=st.integers(0, 10),
    rate_window_s=st.sampled_from([10.0, 60.0]),
    max_in_flight=st.integers(1, 8),
    success_threshold=st.floats(0.0, 1.0),
    abort_failure_share=st.floats(0.0, 1.0),
    abort_min_finished=st.integers(1, 10),
    device_timeout_s=st.sampled_from([20.0, 60.0]),
    offline=st.sampled_from(["wait", "skip"]),
    revert_on_abort=st.booleans(),
)
fates = st.tuples(st.sampled_from(["succeeded", "failed", "stuck"]), st.integers(0, 6))


def build(policy: Policy, fleet: list[tuple[tuple[str, int], bool]]) -> Sim:
    devices = {
        f"d{i:03d}": DeviceView(id=f"d{i:03d}", seq=i, state="pending", online=online)
        for i, (_fate, online) in enumerate(fleet)
    }
    fate = {f"d{i:03d}": f for i, (f, _online) in enumerate(fleet)}
    return Sim(policy, devices, fate, RolloutView(state="running"), starts=[])


@settings(max_examples=150, deadline=None)
@given(policies, st.lists(st.tuples(fates, st.booleans()), min_size=1, max_size=40))
def test_limits_hold_and_every_rollout_ends(
    policy: Policy, fleet: list[tuple[tuple[str, int], bool]]
) -> None:
    sim = build(policy, fleet)
    # Each device takes at most the timeout; a generous bound on the steps to the end.
    bound = 10 + len(fleet) * int(policy.device_timeout_s / STEP_S + 2) * 2
    bound += len(fleet) * int(policy.rate_window_s / STEP_S + 1)
    for _ in range(bound):
        if sim.rollout.state in ENDED and not any(
            d.state in IN_FLIGHT | {"reverting"} for d in sim.devices.values()
        ):
            break
        sim.step()
    assert sim.rollout.state in ENDED, "stuck devices or limits held the rollout"
    states = [d.state for d in sim.devices.values()]
    if sim.rollout.state == "completed":
        assert all(s in FINISHED | {"skipped"} for s in states)
    # A device that never answers ends timed out, whatever became of the rollout.
    for device_id, (fate, _steps) in sim.fate.items():
        if fate == "stuck" and sim.devices[device_id].started_at is not None:
            assert sim.devices[device_id].state == "timed_out"


@settings(max_examples=100, deadline=None)
@given(
    canary=st.integers(3, 10),
    abort_min=st.integers(1, 3),
    share=st.floats(0.0, 0.9),
    size=st.integers(20, 60),
)
def test_a_failing_canary_aborts_within_the_canary(
    canary: int, abort_min: int, share: float, size: int
) -> None:
    policy = Policy(
        phases=(Phase(count=canary), Phase(percent=100.0)),
        max_in_flight=canary,
        abort_failure_share=share,
        abort_min_finished=abort_min,
        success_threshold=0.0,
    )
    sim = build(policy, [(("failed", 1), True)] * size)
    for _ in range(20):
        sim.step()
        if sim.rollout.state in ENDED:
            break
    assert sim.rollout.state == "aborted"
    started = {d for _, d in sim.starts or []}
    assert len(started) <= canary  # no device beyond the canary was ever started
    failed = sum(d.state in FAILURES for d in sim.devices.values())
    assert failed >= abort_min


@settings(max_examples=60, deadline=None)
@given(size=st.integers(2, 30), late=st.integers(1, 10))
def test_late_joiners_are_updated(size: int, late: int) -> None:
    policy = Policy(phases=(Phase(count=1), Phase(percent=100.0)), max_in_flight=4)
    sim = build(policy, [(("succeeded", 1), True)] * size)
    for i in range(late):
        sim.step()
        device_id = f"late{i}"
        sim.devices[device_id] = DeviceView(id=device_id, seq=size + i, state="pending")
        sim.fate[device_id] = ("succeeded", 1)
    for _ in range(200):
        if sim.rollout.state in ENDED:
            break
        sim.step()
    assert sim.rollout.state == "completed"
    assert all(d.state == "succeeded" for d in sim.devices.values())


@settings(max_examples=60, deadline=None)
@given(size=st.integers(3, 30), canary=st.integers(1, 2), steps=st.integers(1, 40))
def test_approval_gate_holds(size: int, canary: int, steps: int) -> None:
    policy = Policy(
        phases=(Phase(count=canary), Phase(percent=100.0, approval=True)), max_in_flight=5
    )
    sim = build(policy, [(("succeeded", 1), True)] * size)
    for _ in range(steps):
        sim.step()
    assert len(sim.starts or []) <= canary
    assert sim.rollout.state in ("running", "waiting_approval")
    sim.rollout = replace(sim.rollout, approved=frozenset({1}))
    for _ in range(100):
        if sim.rollout.state in ENDED:
            break
        sim.step()
    assert sim.rollout.state == "completed"
