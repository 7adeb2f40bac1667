"""Jobs, rounds and updates in SQL, on SQLite and PostgreSQL."""

from __future__ import annotations

import time
import uuid

import pytest

from lepton.coordinator.errors import ConflictError, LeaseLostError, NotFoundError
from lepton.coordinator.fl import tables
from lepton.coordinator.fl.store import FLStore
from lepton.coordinator.store import Store


@pytest.fixture
def fl(store: Store) -> FLStore:
    store.create_schema(tables.metadata)
    return FLStore(store.engine)


def open_job(fl: FLStore) -> str:
    job_id = f"job-{uuid.uuid4().hex[:8]}"  # the PostgreSQL schema is shared by the session
    now = time.time()
    fl.create_job(job_id, "digits", {"name": "digits"}, now)
    fl.update_job(job_id, state="running", round=1, global_digest="a" * 64)
    fl.open_round(
        job_id,
        1,
        selected=["d1", "d2"],
        tokens={"d1": "t1", "d2": "t2"},
        tasks={"d1": "task1", "d2": "task2"},
        selection={"method": "cost"},
        base_digest="a" * 64,
        started_at=now,
        deadline=now + 30,
    )
    return job_id


def test_jobs_are_created_once_and_stopped(fl: FLStore) -> None:
    job_id = open_job(fl)
    with pytest.raises(ConflictError):
        fl.create_job(job_id, "digits", {}, time.time())
    assert fl.get_job(job_id).state == "running"
    assert job_id in {j.id for j in fl.list_jobs(states=["running"])}
    assert fl.request_stop(job_id).state == "stopping"
    with pytest.raises(NotFoundError):
        fl.get_job("nope")
    with pytest.raises(NotFoundError):
        fl.request_stop("nope")


def test_an_update_slot_is_filled_once(fl: FLStore) -> None:
    job_id = open_job(fl)
    kw = {"size": 10, "compression": "int8", "now": time.time()}
    assert fl.record_update(job_id, 1, "d1", digest="b" * 64, **kw) == "accepted"  # type: ignore[arg-type]
    assert fl.record_update(job_id, 1, "d1", digest="b" * 64, **kw) == "duplicate"  # type: ignore[arg-type]
    assert fl.record_update(job_id, 1, "d1", digest="c" * 64, **kw) == "conflict"  # type: ignore[arg-type]
    assert fl.record_update(job_id, 1, "d9", digest="c" * 64, **kw) == "not_selected"  # type: ignore[arg-type]
    assert fl.record_update(job_id, 2, "d1", digest="c" * 64, **kw) == "unknown"  # type: ignore[arg-type]
    [up] = fl.updates_for(job_id, 1)
    assert (up.device_id, up.digest, up.complete) == ("d1", "b" * 64, False)
    assert fl.link_result(job_id, 1, "d1", result_id="r1", examples=42, metrics={"loss": 0.5})
    assert not fl.link_result(job_id, 1, "d1", result_id="r2", examples=1, metrics={})
    [up] = fl.updates_for(job_id, 1)
    assert up.complete
    assert (up.result_id, up.examples, up.metrics) == ("r1", 42, {"loss": 0.5})
    assert fl.examples_by_device(job_id) == {"d1": 42}


def test_rounds_extend_close_once_and_count_rejects(fl: FLStore) -> None:
    job_id = open_job(fl)
    fl.note_reject(job_id, 1, "malformed")
    fl.note_reject(job_id, 1, "malformed")
    fl.note_reject(job_id, 7, "malformed")  # no such round: nothing to count against
    extended = fl.extend_round(
        job_id,
        1,
        selected=["d3"],
        tokens={"d3": "t3"},
        tasks={"d3": "task3"},
        deadline=time.time() + 60,
    )
    assert extended.attempt == 2
    assert extended.selected == ["d1", "d2", "d3"]
    assert extended.rejects == {"malformed": 2}
    now = time.time()
    closed = fl.close_round(
        job_id,
        1,
        state="closed",
        now=now,
        new_digest="d" * 64,
        strategy_state={},
        contributors=["d1"],
        metrics={"accuracy": 0.5},
        job_values={"round": 2, "global_digest": "d" * 64},
    )
    assert closed
    assert not fl.close_round(job_id, 1, state="closed", now=now)  # closed once
    job = fl.get_job(job_id)
    assert (job.round, job.global_digest) == (2, "d" * 64)
    assert (
        fl.record_update(job_id, 1, "d2", digest="e" * 64, size=1, compression="fp32", now=now)
        == "closed"
    )
    [rnd] = fl.list_rounds(job_id)
    assert (rnd.state, rnd.contributors, rnd.metrics) == ("closed", ["d1"], {"accuracy": 0.5})


def test_leader_writes_are_fenced(fl: FLStore, store: Store) -> None:
    job_id = open_job(fl)
    now = time.time()
    lease = store.leases.acquire_lease(f"fl-{job_id}", "me", now, 30.0)
    assert lease is not None
    fl.update_job(job_id, error="x", lease=lease)
    assert store.leases.acquire_lease(f"fl-{job_id}", "other", now + 60, 30.0) is not None
    with pytest.raises(LeaseLostError):
        fl.update_job(job_id, error="y", lease=lease)
    assert fl.get_job(job_id).error == "x"


def test_a_round_keeps_the_data_sizes_its_devices_reported_when_selected(fl: FLStore) -> None:
    """Finding 4 of the hardening review: a device's claimed example count is bounded by the
    size it reported before the round, so the round keeps it, extensions included."""
    job_id = open_job(fl)
    rnd = fl.get_round(job_id, 1)
    assert rnd is not None
    assert rnd.reported_sizes == {}  # devices that reported no size: nothing recorded
    now = time.time()
    fl.create_job(f"{job_id}-2", "digits", {"name": "digits"}, now)
    opened = fl.open_round(
        f"{job_id}-2",
        1,
        selected=["d1", "d2"],
        tokens={"d1": "t1", "d2": "t2"},
        tasks={"d1": "task1", "d2": "task2"},
        selection={},
        base_digest="a" * 64,
        started_at=now,
        deadline=now + 30,
        reported_sizes={"d1": 180},
    )
    assert opened.reported_sizes == {"d1": 180}
    # More devices for a short round: theirs are added; d1's, from before the round, stays
    # whatever d1 reports now.
    extended = fl.extend_round(
        f"{job_id}-2",
        1,
        selected=["d3"],
        tokens={"d3": "t3"},
        tasks={"d3": "task3"},
        deadline=now + 60,
        reported_sizes={"d3": 7, "d1": 10**9},
    )
    assert extended.reported_sizes == {"d1": 180, "d3": 7}
    assert fl.list_rounds(f"{job_id}-2")[0].reported_sizes == {"d1": 180, "d3": 7}
