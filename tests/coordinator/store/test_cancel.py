"""Task cancellation in the store, on both backends: a pending task ends at once, an
assigned or running one when its device answers; no result of a cancelled task is applied."""

from __future__ import annotations

import pytest

from lepton.coordinator.errors import NotFoundError
from lepton.coordinator.store import Assignment, StateUpdate, Store
from lepton.protocol.messages import Result, State, TaskAck
from tests.coordinator.factories import new_task, sample

T0 = 1_700_000_000.0


@pytest.fixture
def fleet(store: Store) -> Store:
    store.devices.record_capacity([sample("a", received_at=T0), sample("b", received_at=T0)])
    return store


def _running(store: Store, task_id: str = "t1", device: str = "a") -> None:
    store.tasks.submit(new_task(task_id, now=T0, demand_gops=4.0))
    (d,) = store.tasks.assign([Assignment(task_id=task_id, device_id=device)], T0 + 1)
    store.tasks.mark_dispatched([(d.task_id, d.attempt)], T0 + 1)
    store.tasks.apply_acks(device, [TaskAck(task_id=task_id, accepted=True)], T0 + 2)


def _result(status: str, *, rid: str = "r1", task_id: str = "t1", attempt: int = 1) -> Result:
    return Result(
        id=rid,
        task_id=task_id,
        status=status,  # type: ignore[arg-type]
        attempt=attempt,
        output={"echo": "hi"} if status == "succeeded" else {},
        error=None if status == "succeeded" else f"{status} on purpose",
        started_at=T0 + 2,
        finished_at=T0 + 4,
    )


def test_a_pending_task_is_cancelled_at_once_and_never_placed(fleet: Store) -> None:
    fleet.tasks.submit(new_task("t1", now=T0))
    out = fleet.cancels.cancel_task("t1", "not needed", T0 + 1)
    assert (out.outcome, out.state, out.changed) == ("cancelled", "cancelled", True)
    task = fleet.tasks.get_task("t1")
    assert (task.state, task.finished_at, task.cancel_reason) == ("cancelled", T0 + 1, "not needed")
    assert task.last_error == "cancelled: not needed"
    assert fleet.tasks.due_pending(T0 + 2, limit=10) == []
    assert fleet.tasks.assign([Assignment(task_id="t1", device_id="a")], T0 + 2) == []
    assert fleet.tasks.count_tasks()["cancelled"] == 1
    # Idempotent: a second cancel answers the same and changes nothing.
    again = fleet.cancels.cancel_task("t1", "other reason", T0 + 3)
    assert (again.outcome, again.state, again.changed) == ("cancelled", "cancelled", False)
    assert fleet.tasks.get_task("t1").cancel_reason == "not needed"
    assert fleet.cancels.cancels_due(T0 + 4, resend_after_s=1.0) == []


def test_unknown_and_finished_tasks(fleet: Store) -> None:
    with pytest.raises(NotFoundError):
        fleet.cancels.cancel_task("nope", "x", T0)
    _running(fleet)
    fleet.results.apply_results("a", [_result("succeeded")], T0 + 5)
    out = fleet.cancels.cancel_task("t1", "too late", T0 + 6)
    assert (out.outcome, out.state) == ("finished", "succeeded")
    task = fleet.tasks.get_task("t1")
    assert (task.state, task.cancel_requested_at, task.output) == (
        "succeeded",
        None,
        {"echo": "hi"},
    )
    outs = fleet.cancels.cancel_tasks(["nope", "t1"], "batch", T0 + 7)
    assert [(o.task_id, o.outcome) for o in outs] == [("nope", "unknown"), ("t1", "finished")]


def test_a_running_task_is_cancelled_when_its_device_answers(fleet: Store) -> None:
    _running(fleet)
    out = fleet.cancels.cancel_task("t1", "user", T0 + 3)
    assert (out.outcome, out.state, out.device_id) == ("requested", "running", "a")
    (due,) = fleet.cancels.cancels_due(T0 + 3, resend_after_s=5.0)
    assert (due.task_id, due.device_id, due.reason) == ("t1", "a", "user")
    fleet.cancels.mark_cancels_sent(["t1"], T0 + 3)
    # Sent, not answered: due again only after resend_after_s.
    assert fleet.cancels.cancels_due(T0 + 4, resend_after_s=5.0) == []
    assert [c.task_id for c in fleet.cancels.cancels_due(T0 + 8, resend_after_s=5.0)] == ["t1"]
    # A cancel-requested running task is not timed out and retried like others.
    assert fleet.tasks.sweep_timeouts(T0 + 10_000, ack_timeout_s=1, run_timeout_s=1) == []
    (res,) = fleet.results.apply_results("a", [_result("cancelled")], T0 + 9)
    assert (res.outcome, res.ack, res.task_state) == ("cancelled", True, "cancelled")
    task = fleet.tasks.get_task("t1")
    assert (task.state, task.result_id, task.output) == ("cancelled", "r1", None)
    (stored,) = fleet.results.results_for("t1")
    assert (stored.status, stored.applied) == ("cancelled", False)
    (attempt,) = fleet.tasks.attempts("t1")
    assert attempt.outcome == "cancelled"
    assert fleet.cancels.cancels_due(T0 + 100, resend_after_s=5.0) == []
    assert fleet.tasks.inflight_by_device() == {}


def test_a_success_after_the_cancel_is_stored_but_not_applied(fleet: Store) -> None:
    _running(fleet)
    fleet.cancels.cancel_task("t1", "user", T0 + 3)
    (res,) = fleet.results.apply_results("a", [_result("succeeded")], T0 + 5)
    assert (res.outcome, res.ack, res.task_state) == ("cancelled", True, "cancelled")
    task = fleet.tasks.get_task("t1")
    assert (task.state, task.output) == ("cancelled", None)
    (stored,) = fleet.results.results_for("t1")
    assert (stored.status, stored.applied) == ("succeeded", False)
    # No throughput learnt from work whose result was not taken.
    assert fleet.estimates.pending_observations() == []
    # A later result (another id) of the cancelled task: stale, acknowledged, not applied.
    (late,) = fleet.results.apply_results("a", [_result("succeeded", rid="r2")], T0 + 6)
    assert (late.outcome, late.ack, late.task_state) == ("stale", True, "cancelled")
    assert fleet.tasks.get_task("t1").state == "cancelled"


def test_an_assigned_task_refused_after_the_cancel_ends_cancelled(fleet: Store) -> None:
    fleet.tasks.submit(new_task("t1", now=T0))
    (d,) = fleet.tasks.assign([Assignment(task_id="t1", device_id="a")], T0 + 1)
    out = fleet.cancels.cancel_task("t1", "user", T0 + 1.5)
    assert (out.outcome, out.state) == ("requested", "assigned")
    # The Task message is not sent again while its cancel is pending.
    assert fleet.tasks.undispatched(T0 + 100, older_than_s=1.0) == []
    (ack,) = fleet.tasks.apply_acks(
        "a", [TaskAck(task_id="t1", accepted=False, reason="cancelled")], T0 + 2
    )
    assert (ack.outcome, ack.task_state) == ("cancelled", "cancelled")
    assert fleet.tasks.get_task("t1").state == "cancelled"
    assert d.attempt == 1


def test_a_device_going_offline_ends_its_cancel_requested_task(fleet: Store) -> None:
    _running(fleet)
    fleet.cancels.cancel_task("t1", "user", T0 + 3)
    offline = StateUpdate("a", "default", State(state="offline", ts=T0 + 4), T0 + 4, False)
    (requeued,) = fleet.devices.apply_states([offline])
    assert requeued == ["t1"]
    task = fleet.tasks.get_task("t1")
    assert (task.state, task.attempt) == ("cancelled", 1)
    assert fleet.tasks.due_pending(T0 + 10, limit=10) == []


def test_an_unanswered_cancel_is_given_up_on(fleet: Store) -> None:
    _running(fleet)
    fleet.cancels.cancel_task("t1", "user", T0 + 3)
    for i in range(3):
        now = T0 + 3 + 10 * i
        assert [
            c.task_id for c in fleet.cancels.cancels_due(now, resend_after_s=5.0, max_sends=3)
        ] == ["t1"]
        fleet.cancels.mark_cancels_sent(["t1"], now)
        assert fleet.cancels.sweep_cancels(now + 1, resend_after_s=5.0, max_sends=3) == []
    assert fleet.cancels.cancels_due(T0 + 100, resend_after_s=5.0, max_sends=3) == []
    assert fleet.cancels.sweep_cancels(T0 + 100, resend_after_s=5.0, max_sends=3) == ["t1"]
    task = fleet.tasks.get_task("t1")
    assert task.state == "cancelled"
    (attempt,) = fleet.tasks.attempts("t1")
    assert attempt.outcome == "cancel_unanswered"
    # The device's answer, when it comes after all, is kept and acknowledged, not applied.
    (res,) = fleet.results.apply_results("a", [_result("succeeded")], T0 + 200)
    assert (res.outcome, res.ack) == ("stale", True)
