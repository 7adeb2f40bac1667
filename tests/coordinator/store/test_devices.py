"""Registry storage on both backends: capacity batches, birth and will, the deadline sweep."""

from __future__ import annotations

import pytest

from lepton.coordinator.errors import NotFoundError
from lepton.coordinator.store import Assignment, Store
from lepton.protocol.messages import State, TaskAck
from tests.coordinator.factories import new_task, sample

T0 = 1_700_000_000.0


def test_schema_is_created_once_and_again(store: Store) -> None:
    store.create_schema()
    assert "devices" in store.table_names()
    assert store.ping()


def test_capacity_batch_creates_and_updates_devices(store: Store) -> None:
    assert (
        store.devices.record_capacity([sample("a", received_at=T0), sample("b", received_at=T0)])
        == 2
    )
    a = store.devices.get_device("a")
    assert a.state == "online"
    assert a.first_seen == a.last_seen == T0
    assert a.report_interval_s == 5.0
    assert a.device_class == "rpi5"
    assert a.runtimes == ["onnxruntime"]
    cap = a.capacity()
    assert cap is not None
    assert cap.slots.total == 2
    store.devices.record_capacity([sample("a", received_at=T0 + 5, slots=4)])
    a = store.devices.get_device("a")
    assert a.last_seen == T0 + 5
    assert a.first_seen == T0
    assert a.reports == 2
    assert a.report is not None
    assert a.report["slots"]["total"] == 4
    assert store.devices.count_devices() == {"online": 2, "offline": 0}
    assert [d.id for d in store.devices.list_devices()] == ["a", "b"]


def test_older_report_does_not_replace_newer(store: Store) -> None:
    store.devices.record_capacity([sample("a", received_at=T0 + 10, slots=4)])
    store.devices.record_capacity([sample("a", received_at=T0 + 11, ts=T0, slots=1)])
    a = store.devices.get_device("a")
    assert a.report is not None
    assert a.report["slots"]["total"] == 4
    assert a.last_seen == T0 + 11  # still a sign of life


def test_duplicate_devices_in_one_batch_keep_the_newest(store: Store) -> None:
    store.devices.record_capacity(
        [sample("a", received_at=T0, slots=1), sample("a", received_at=T0 + 1, slots=3)]
    )
    a = store.devices.get_device("a")
    assert a.report is not None
    assert a.report["slots"]["total"] == 3
    assert len(store.devices.capacity_history("a")) == 2


def test_capacity_history_is_bounded(store: Store) -> None:
    for i in range(12):
        store.devices.record_capacity([sample("a", received_at=T0 + i)])
    history = store.devices.capacity_history("a", limit=100)
    assert len(history) == 5  # the fixture keeps 5
    assert [p.received_at for p in history] == [T0 + i for i in (11, 10, 9, 8, 7)]


def test_will_marks_offline_and_requeues_tasks(store: Store) -> None:
    store.devices.record_capacity([sample("a", received_at=T0)])
    store.tasks.submit(new_task("t1", now=T0))
    store.tasks.assign([Assignment(task_id="t1", device_id="a")], T0 + 1)
    requeued = store.devices.apply_state("a", "default", State(state="offline"), T0 + 2)
    assert requeued == ["t1"]
    dev = store.devices.get_device("a")
    assert dev.state == "offline"
    assert dev.offline_reason == "last will"
    task = store.tasks.get_task("t1")
    assert task.state == "pending"
    assert task.device_id is None
    assert task.attempt == 1
    assert task.next_attempt_at == T0 + 2  # no backoff: not the task's fault
    assert "offline" in (task.last_error or "")
    (attempt,) = store.tasks.attempts("t1")
    assert attempt.outcome == "device_offline"


def test_report_received_before_the_will_does_not_revive(store: Store) -> None:
    store.devices.record_capacity([sample("a", received_at=T0)])
    store.devices.apply_state("a", "default", State(state="offline"), T0 + 2)
    store.devices.record_capacity([sample("a", received_at=T0 + 1)])  # flushed late
    assert store.devices.get_device("a").state == "offline"
    store.devices.record_capacity([sample("a", received_at=T0 + 3)])
    dev = store.devices.get_device("a")
    assert dev.state == "online"
    assert dev.offline_reason is None


def test_will_received_before_the_current_birth_is_stale(store: Store) -> None:
    """Finding 5 of the hardening review: a will applied after the birth of the device's next
    connection (replicas share the subscription) neither takes it offline nor requeues."""
    store.devices.record_capacity([sample("a", received_at=T0)])
    store.tasks.submit(new_task("t1", now=T0))
    store.tasks.assign([Assignment(task_id="t1", device_id="a")], T0 + 1)
    store.devices.apply_state("a", "default", State(state="online"), T0 + 3)
    assert store.devices.apply_state("a", "default", State(state="offline"), T0 + 2) == []
    dev = store.devices.get_device("a")
    assert (dev.state, dev.state_at, dev.offline_reason) == ("online", T0 + 3, None)
    task = store.tasks.get_task("t1")
    assert (task.state, task.device_id) == ("assigned", "a")
    assert store.devices.apply_state("a", "default", State(state="offline"), T0 + 4) == ["t1"]
    assert store.devices.get_device("a").state == "offline"


def test_birth_creates_device_and_retained_birth_is_no_sign_of_life(store: Store) -> None:
    birth = State(
        state="online", agent_version="1.2", device_class="jetson", runtimes=["onnxruntime"]
    )
    store.devices.apply_state("j", "default", birth, T0)
    dev = store.devices.get_device("j")
    assert (dev.state, dev.agent_version, dev.device_class) == ("online", "1.2", "jetson")
    store.devices.apply_state("j", "default", birth, T0 + 50, retained=True)
    assert store.devices.get_device("j").last_seen == T0
    store.devices.apply_state("j", "default", birth, T0 + 60)
    assert store.devices.get_device("j").last_seen == T0 + 60


def test_will_of_unknown_device_is_recorded_offline(store: Store) -> None:
    assert (
        store.devices.apply_state("ghost", "default", State(state="offline", reason="bye"), T0)
        == []
    )
    dev = store.devices.get_device("ghost")
    assert dev.state == "offline"
    assert dev.offline_reason == "bye"


def test_deadline_sweep_uses_declared_interval(store: Store) -> None:
    store.devices.record_capacity([sample("fast", received_at=T0, interval_s=1.0)])
    store.devices.record_capacity([sample("slow", received_at=T0, interval_s=60.0)])
    store.tasks.submit(new_task("t1", now=T0, pinned_device="fast"))
    store.tasks.assign([Assignment(task_id="t1", device_id="fast")], T0)
    assert store.devices.next_deadline(missed=3, default_interval_s=30) == T0 + 3
    assert store.devices.mark_stale_offline(T0 + 2.5, missed=3, default_interval_s=30) == {}
    out = store.devices.mark_stale_offline(T0 + 3.5, missed=3, default_interval_s=30)
    assert out == {"fast": ["t1"]}
    assert store.devices.get_device("fast").offline_reason == "missed reports"
    assert store.devices.get_device("slow").state == "online"
    assert store.devices.next_deadline(missed=3, default_interval_s=30) == T0 + 180
    assert store.tasks.get_task("t1").state == "pending"


def test_unknown_device_raises(store: Store) -> None:
    with pytest.raises(NotFoundError):
        store.devices.get_device("nope")
    assert not store.devices.device_exists("nope")


def test_groups(store: Store) -> None:
    store.devices.record_capacity([sample("a", received_at=T0)])
    assert store.devices.set_groups("a", ["lab", "edge", "lab"]).groups == ["edge", "lab"]


def test_deadlines_count_from_the_seen_floor(store: Store) -> None:
    """Finding 6 of the hardening review: after the coordinator's own link was down, a device
    is judged from the moment the link came back, with its full intervals to report again."""
    store.devices.record_capacity([sample("a", received_at=T0, interval_s=1.0)])
    back = T0 + 100  # the link was down from about T0 to T0 + 100
    assert store.devices.next_deadline(missed=3, default_interval_s=30, seen_floor=back) == back + 3
    assert (
        store.devices.mark_stale_offline(
            back + 2.5, missed=3, default_interval_s=30, seen_floor=back
        )
        == {}
    )
    assert store.devices.get_device("a").state == "online"
    assert store.devices.mark_stale_offline(
        back + 3.5, missed=3, default_interval_s=30, seen_floor=back
    ) == {"a": []}


def test_requeue_before_the_device_acknowledged_burns_no_attempt(store: Store) -> None:
    """Finding 6: an attempt taken back from a device that never acknowledged it (it may never
    have reached the broker) does not count against max_attempts; an acknowledged one does."""
    store.devices.record_capacity([sample("a", received_at=T0)])
    store.tasks.submit(new_task("t1", now=T0, max_attempts=1))
    store.tasks.assign([Assignment(task_id="t1", device_id="a")], T0 + 1)
    assert store.devices.apply_state("a", "default", State(state="offline"), T0 + 2) == ["t1"]
    task = store.tasks.get_task("t1")
    assert (task.state, task.attempt) == ("pending", 1)
    store.devices.apply_state("a", "default", State(state="online"), T0 + 3)
    store.tasks.assign([Assignment(task_id="t1", device_id="a")], T0 + 4)
    (ack,) = store.tasks.apply_acks("a", [TaskAck(task_id="t1", accepted=True)], T0 + 5)
    assert ack.outcome == "running"
    assert store.devices.apply_state("a", "default", State(state="offline"), T0 + 6) == ["t1"]
    task = store.tasks.get_task("t1")
    assert (task.state, task.attempt) == ("failed", 2)
    assert [(a.outcome, a.acked_at) for a in store.tasks.attempts("t1")] == [
        ("device_offline", None),
        ("device_offline", T0 + 5),
    ]
