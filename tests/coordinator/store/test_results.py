"""Result application on both backends: exactly once, only from the device that held it."""

from __future__ import annotations

import threading

import pytest

from lepton.coordinator.store import Assignment, Store
from lepton.protocol.messages import Result, State, TaskAck
from tests.coordinator.factories import new_task, sample

T0 = 1_700_000_000.0


@pytest.fixture
def fleet(store: Store) -> Store:
    store.devices.record_capacity([sample("a", received_at=T0), sample("b", received_at=T0)])
    store.tasks.submit(new_task("t1", now=T0, demand_gops=4.0, model_class="mlp"))
    (d,) = store.tasks.assign([Assignment(task_id="t1", device_id="a")], T0 + 1)
    store.tasks.mark_dispatched([(d.task_id, d.attempt)], T0 + 1)
    store.tasks.apply_acks("a", [TaskAck(task_id="t1", accepted=True)], T0 + 2)
    return store


def ok(task_id: str = "t1", *, rid: str = "r1", attempt: int = 1) -> Result:
    return Result(
        id=rid,
        task_id=task_id,
        status="succeeded",
        attempt=attempt,
        output={"echo": "hi"},
        started_at=T0 + 2,
        finished_at=T0 + 4,
    )


def test_success_is_applied_once_and_replays_are_acked(fleet: Store) -> None:
    (out,) = fleet.results.apply_results("a", [ok()], T0 + 5)
    assert (out.outcome, out.ack, out.task_state) == ("applied", True, "succeeded")
    assert out.task_kind == fleet.tasks.get_task("t1").kind  # what a feature reacts on, not the id
    task = fleet.tasks.get_task("t1")
    assert (task.state, task.output, task.result_id) == ("succeeded", {"echo": "hi"}, "r1")
    # Observed throughput goes to the estimator queue: 4 GOP in 2 s.
    (obs,) = fleet.estimates.pending_observations()
    assert (obs.device_id, obs.model_class, obs.demand_gops, obs.seconds) == ("a", "mlp", 4.0, 2.0)
    (again,) = fleet.results.apply_results("a", [ok()], T0 + 6)
    assert (again.outcome, again.ack) == ("replayed", True)
    assert len(fleet.results.results_for("t1")) == 1
    assert len(fleet.estimates.pending_observations()) == 1
    assert fleet.tasks.get_task("t1").finished_at == T0 + 5


def test_result_for_a_task_held_by_another_device_is_spoofed(fleet: Store) -> None:
    (out,) = fleet.results.apply_results("b", [ok(rid="evil")], T0 + 5)
    assert (out.outcome, out.ack) == ("spoofed", False)
    assert fleet.tasks.get_task("t1").state == "running"
    assert fleet.results.results_for("t1") == []
    # Replaying a real result id from another device is spoofing too.
    fleet.results.apply_results("a", [ok()], T0 + 6)
    (out,) = fleet.results.apply_results("b", [ok()], T0 + 7)
    assert out.outcome == "spoofed"


def test_unknown_task_and_unknown_device(fleet: Store) -> None:
    (out,) = fleet.results.apply_results("a", [ok("nope", rid="r9")], T0 + 5)
    assert (out.outcome, out.ack) == ("unknown_task", False)
    (out,) = fleet.results.apply_results("stranger", [ok(rid="r8")], T0 + 5)
    assert (out.outcome, out.ack) == ("unknown_device", False)
    assert fleet.tasks.get_task("t1").state == "running"


def test_failure_retries_then_fails(fleet: Store) -> None:
    fail = Result(id="f1", task_id="t1", status="failed", attempt=1, error="boom")
    (out,) = fleet.results.apply_results("a", [fail], T0 + 5)
    assert (out.outcome, out.task_state) == ("applied", "pending")
    task = fleet.tasks.get_task("t1")
    assert task.last_error == "boom"
    assert task.next_attempt_at == T0 + 5 + 10


def test_a_task_that_crashed_its_agent_is_run_nowhere_else(fleet: Store) -> None:
    # The agent quarantined it after it was running each time the agent died; another
    # device would die the same way.
    crashed = Result(
        id="c1",
        task_id="t1",
        status="failed",
        attempt=1,
        error="crashed_agent: the agent died 2 times while running this train task",
        reason="crashed_agent",
    )
    (out,) = fleet.results.apply_results("a", [crashed], T0 + 5)
    assert (out.outcome, out.task_state) == ("applied", "failed")
    task = fleet.tasks.get_task("t1")
    assert task.last_error.startswith("crashed_agent")
    assert task.attempt < task.max_attempts  # it had attempts left and used none of them
    assert [a.outcome for a in fleet.tasks.attempts("t1")] == ["crashed_agent"]


def test_stale_failure_is_kept_but_not_applied(fleet: Store) -> None:
    fleet.devices.apply_state("a", "default", State(state="offline"), T0 + 3)
    (d,) = fleet.tasks.assign([Assignment(task_id="t1", device_id="b")], T0 + 4)
    assert d.attempt == 2
    late = Result(id="f1", task_id="t1", status="failed", attempt=1, error="late")
    (out,) = fleet.results.apply_results("a", [late], T0 + 5)
    assert (out.outcome, out.ack) == ("stale", True)
    assert fleet.tasks.get_task("t1").state == "assigned"
    (rec,) = fleet.results.results_for("t1")
    assert rec.applied is False


def test_late_success_of_an_earlier_attempt_wins(fleet: Store) -> None:
    fleet.devices.apply_state("a", "default", State(state="offline"), T0 + 3)
    fleet.tasks.assign([Assignment(task_id="t1", device_id="b")], T0 + 4)
    (out,) = fleet.results.apply_results("a", [ok()], T0 + 5)
    assert (out.outcome, out.task_state) == ("applied", "succeeded")
    task = fleet.tasks.get_task("t1")
    assert (task.state, task.device_id) == ("succeeded", "a")
    assert [a.outcome for a in fleet.tasks.attempts("t1")] == ["device_offline", "superseded"]
    # The second attempt's result, when it comes, is stale.
    (out,) = fleet.results.apply_results("b", [ok(rid="r2", attempt=2)], T0 + 6)
    assert out.outcome == "stale"
    assert fleet.tasks.get_task("t1").result_id == "r1"


def test_expired_result(fleet: Store) -> None:
    res = Result(id="e1", task_id="t1", status="expired", attempt=1)
    (out,) = fleet.results.apply_results("a", [res], T0 + 5)
    assert out.task_state == "expired"


def test_concurrent_replays_apply_once(fleet: Store) -> None:
    outcomes: list[str] = []
    barrier = threading.Barrier(4)

    def apply() -> None:
        barrier.wait()
        (o,) = fleet.results.apply_results("a", [ok()], T0 + 5)
        outcomes.append(o.outcome)

    threads = [threading.Thread(target=apply) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["applied", "replayed", "replayed", "replayed"]
    assert len(fleet.estimates.pending_observations()) == 1


def test_estimates_roundtrip_consumes_observations(fleet: Store) -> None:
    fleet.results.apply_results("a", [ok()], T0 + 5)
    obs = fleet.estimates.pending_observations()
    assert fleet.estimates.load_estimates() is None
    fleet.estimates.save_estimates({"version": 1, "rates": []}, [o.id for o in obs], T0 + 6)
    assert fleet.estimates.load_estimates() == {"version": 1, "rates": []}
    assert fleet.estimates.pending_observations() == []
