"""Task lifecycle storage on both backends: submit, placement, acks, timeouts, expiry."""

from __future__ import annotations

import pytest

from lepton.coordinator.errors import ConflictError, LeaseLostError, NotFoundError
from lepton.coordinator.store import Assignment, Store
from lepton.protocol.messages import TaskAck
from tests.coordinator.factories import new_task, sample

T0 = 1_700_000_000.0


@pytest.fixture
def fleet(store: Store) -> Store:
    store.devices.record_capacity([sample("a", received_at=T0), sample("b", received_at=T0)])
    return store


def _assign(store: Store, task_id: str, device: str, now: float = T0 + 1) -> None:
    (d,) = store.tasks.assign([Assignment(task_id=task_id, device_id=device)], now)
    store.tasks.mark_dispatched([(d.task_id, d.attempt)], now)


def test_submit_get_list_count(store: Store) -> None:
    rec = store.tasks.submit(new_task("t1", now=T0, demand_gops=5.0, precision="int8"))
    assert (rec.state, rec.attempt, rec.demand_gops, rec.precision) == ("pending", 0, 5.0, "int8")
    store.tasks.submit(new_task("t2", now=T0 + 1, kind="benchmark"))
    assert [t.id for t in store.tasks.list_tasks()] == ["t2", "t1"]
    assert [t.id for t in store.tasks.list_tasks(kind="echo")] == ["t1"]
    assert [t.id for t in store.tasks.list_tasks(limit=1, offset=1)] == ["t1"]
    assert store.tasks.count_tasks()["pending"] == 2
    assert store.tasks.count_tasks()["failed"] == 0
    with pytest.raises(ConflictError):
        store.tasks.submit(new_task("t1", now=T0))
    with pytest.raises(NotFoundError):
        store.tasks.get_task("nope")


def test_submit_many_is_one_transaction(store: Store) -> None:
    recs = store.tasks.submit_many([new_task(f"m{i}", now=T0) for i in range(3)])
    assert [(r.id, r.state) for r in recs] == [
        ("m0", "pending"),
        ("m1", "pending"),
        ("m2", "pending"),
    ]
    assert store.tasks.submit_many([]) == []
    # One taken id: none of the batch is stored.
    with pytest.raises(ConflictError):
        store.tasks.submit_many([new_task("m3", now=T0), new_task("m1", now=T0)])
    with pytest.raises(NotFoundError):
        store.tasks.get_task("m3")
    assert store.tasks.count_tasks()["pending"] == 3


def test_due_pending_and_expiry(store: Store) -> None:
    store.tasks.submit(new_task("old", now=T0, expires_in=10))
    store.tasks.submit(new_task("new", now=T0 + 1))
    assert [t.id for t in store.tasks.due_pending(T0 + 2, limit=10)] == ["old", "new"]
    assert [t.id for t in store.tasks.due_pending(T0 + 2, limit=1)] == ["old"]
    assert store.tasks.expire_due(T0 + 11) == ["old"]
    old = store.tasks.get_task("old")
    assert old.state == "expired"
    assert old.finished_at == T0 + 11
    assert [t.id for t in store.tasks.due_pending(T0 + 12, limit=10)] == ["new"]


def test_assign_builds_the_wire_message_once(fleet: Store) -> None:
    fleet.tasks.submit(new_task("t1", now=T0, params={"payload": [1, 2]}))
    (d,) = fleet.tasks.assign(
        [Assignment(task_id="t1", device_id="a", explanation={"device_id": "a"})], T0 + 1
    )
    assert (d.device_id, d.attempt) == ("a", 1)
    assert d.message.task_id == "t1"
    assert d.message.params == {"payload": [1, 2]}
    assert d.message.attempt == 1
    assert d.message.expires_at == T0 + 3600
    task = fleet.tasks.get_task("t1")
    assert (task.state, task.device_id, task.dispatch_id) == ("assigned", "a", d.message.id)
    assert task.explanation == {"device_id": "a"}
    # Not pending any more: a second plan cannot take it.
    assert fleet.tasks.assign([Assignment(task_id="t1", device_id="b")], T0 + 2) == []
    # Until confirmed sent, it is offered for re-dispatch with the same message id.
    (again,) = fleet.tasks.undispatched(T0 + 20, older_than_s=5)
    assert again.message.id == d.message.id
    fleet.tasks.mark_dispatched([("t1", 1)], T0 + 21)
    assert fleet.tasks.undispatched(T0 + 40, older_than_s=5) == []
    assert fleet.tasks.inflight_by_device() == {"a": 1}


def test_assign_is_fenced_by_the_lease(fleet: Store) -> None:
    fleet.tasks.submit(new_task("t1", now=T0))
    lease = fleet.leases.acquire_lease("scheduler", "me", T0, 10)
    assert lease is not None
    assert (
        len(fleet.tasks.assign([Assignment(task_id="t1", device_id="a")], T0 + 1, lease=lease)) == 1
    )
    fleet.tasks.submit(new_task("t2", now=T0))
    other = fleet.leases.acquire_lease("scheduler", "other", T0 + 11, 10)
    assert other is not None
    assert other.epoch == lease.epoch + 1
    with pytest.raises(LeaseLostError):
        fleet.tasks.assign([Assignment(task_id="t2", device_id="a")], T0 + 12, lease=lease)
    assert fleet.tasks.get_task("t2").state == "pending"


def test_accepted_ack_starts_the_task(fleet: Store) -> None:
    fleet.tasks.submit(new_task("t1", now=T0))
    _assign(fleet, "t1", "a")
    (out,) = fleet.tasks.apply_acks("a", [TaskAck(task_id="t1", accepted=True)], T0 + 2)
    assert out.outcome == "running"
    task = fleet.tasks.get_task("t1")
    assert (task.state, task.started_at) == ("running", T0 + 2)
    # A repeated ack changes nothing.
    (out,) = fleet.tasks.apply_acks("a", [TaskAck(task_id="t1", accepted=True)], T0 + 3)
    assert out.outcome == "ignored"
    assert fleet.tasks.attempts("t1")[0].acked_at == T0 + 2


def test_duplicate_refusal_means_the_agent_has_it(fleet: Store) -> None:
    fleet.tasks.submit(new_task("t1", now=T0))
    _assign(fleet, "t1", "a")
    (out,) = fleet.tasks.apply_acks(
        "a", [TaskAck(task_id="t1", accepted=False, reason="duplicate")], T0 + 2
    )
    assert out.outcome == "running"


def test_refusal_retries_with_backoff_then_fails(fleet: Store) -> None:
    fleet.tasks.submit(new_task("t1", now=T0, max_attempts=2))
    _assign(fleet, "t1", "a")
    refuse = TaskAck(task_id="t1", accepted=False, reason="queue_full")
    (out,) = fleet.tasks.apply_acks("a", [refuse], T0 + 2)
    assert out.outcome == "retry"
    task = fleet.tasks.get_task("t1")
    assert (task.state, task.device_id) == ("pending", None)
    assert task.next_attempt_at == T0 + 2 + 10  # base 10 s, attempt 1
    assert "queue_full" in (task.last_error or "")
    assert fleet.tasks.due_pending(T0 + 5, limit=10) == []
    _assign(fleet, "t1", "b", T0 + 13)
    (out,) = fleet.tasks.apply_acks("b", [refuse], T0 + 14)
    assert out.outcome == "failed"
    task = fleet.tasks.get_task("t1")
    assert (task.state, task.attempt) == ("failed", 2)
    assert [a.outcome for a in fleet.tasks.attempts("t1")] == ["refused", "refused"]


def test_expired_refusal_ends_the_task(fleet: Store) -> None:
    fleet.tasks.submit(new_task("t1", now=T0))
    _assign(fleet, "t1", "a")
    (out,) = fleet.tasks.apply_acks(
        "a", [TaskAck(task_id="t1", accepted=False, reason="expired")], T0 + 2
    )
    assert out.outcome == "expired"
    assert fleet.tasks.get_task("t1").state == "expired"


def test_ack_from_another_device_is_spoofed(fleet: Store) -> None:
    fleet.tasks.submit(new_task("t1", now=T0))
    _assign(fleet, "t1", "a")
    (out,) = fleet.tasks.apply_acks(
        "b", [TaskAck(task_id="t1", accepted=False, reason="x")], T0 + 2
    )
    assert out.outcome == "spoofed"
    assert fleet.tasks.get_task("t1").state == "assigned"
    (out,) = fleet.tasks.apply_acks("a", [TaskAck(task_id="nope", accepted=True)], T0 + 2)
    assert out.outcome == "unknown_task"


def test_unacknowledged_attempt_is_resent_then_fails(fleet: Store) -> None:
    fleet.tasks.submit(new_task("quiet", now=T0))
    _assign(fleet, "quiet", "a")
    first = fleet.tasks.get_task("quiet").dispatch_id
    assert fleet.tasks.sweep_timeouts(T0 + 30, ack_timeout_s=60, run_timeout_s=100) == []
    now = T0 + 1
    for _ in range(2):
        now += 61
        assert fleet.tasks.sweep_timeouts(
            now, ack_timeout_s=60, run_timeout_s=100, max_sends=3
        ) == [("quiet", "assigned")]
        (again,) = fleet.tasks.undispatched(now, older_than_s=1000)
        assert again.message.id == first  # the same message: the agent dedups it
        fleet.tasks.mark_dispatched([("quiet", 1)], now)
    assert fleet.tasks.get_task("quiet").sends == 3
    now += 61
    assert fleet.tasks.sweep_timeouts(now, ack_timeout_s=60, run_timeout_s=100, max_sends=3) == [
        ("quiet", "pending")
    ]
    assert fleet.tasks.attempts("quiet")[0].outcome == "ack_timeout"


def test_run_timeout(fleet: Store) -> None:
    fleet.tasks.submit(new_task("slow", now=T0))
    _assign(fleet, "slow", "b")
    fleet.tasks.apply_acks("b", [TaskAck(task_id="slow", accepted=True)], T0 + 2)
    assert fleet.tasks.sweep_timeouts(T0 + 90, ack_timeout_s=60, run_timeout_s=100) == []
    assert fleet.tasks.sweep_timeouts(T0 + 103, ack_timeout_s=60, run_timeout_s=100) == [
        ("slow", "pending")
    ]
    assert fleet.tasks.attempts("slow")[0].outcome == "run_timeout"


def test_unplaced_tasks_step_aside(store: Store) -> None:
    store.tasks.submit(new_task("t1", now=T0))
    store.tasks.note_unassigned(
        {"t1": "no devices"}, {"t1": {"reason": "no devices"}}, T0 + 1, retry_at=T0 + 6
    )
    task = store.tasks.get_task("t1")
    assert (task.state, task.last_error, task.explanation) == (
        "pending",
        "no devices",
        {"reason": "no devices"},
    )
    assert store.tasks.due_pending(T0 + 2, limit=10) == []
    assert len(store.tasks.due_pending(T0 + 6, limit=10)) == 1


def test_retry_that_outlives_expiry_expires(fleet: Store) -> None:
    fleet.tasks.submit(new_task("t1", now=T0, expires_in=5))
    _assign(fleet, "t1", "a")
    (out,) = fleet.tasks.apply_acks(
        "a", [TaskAck(task_id="t1", accepted=False, reason="queue_full")], T0 + 6
    )
    assert out.outcome == "expired"
