"""A round's progress when an update lands while it is being read: the round must not count
the device done without its update (a race that closed rounds short in the FL benchmark)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest

from lepton.coordinator.fl import tables
from lepton.coordinator.fl.jobs.progress import JobState, RoundProgress
from lepton.coordinator.fl.records import UpdateRecord
from lepton.coordinator.fl.store import FLStore
from lepton.coordinator.store import Store
from lepton.protocol.tasks import TrainOutput, UpdateRef

JOB = "digits-0000abcd"
SPEC: dict[str, Any] = {"name": "digits", "model": "lepton.models.digits:DigitsCNN", "data": "d"}
DEVICES = ("a", "b")


def digest(device: str) -> str:
    return device.ljust(64, "0")


class UploadDuringRead(FLStore):
    """The real FL store, where device ``b``'s upload is recorded (and its train task ends
    with its result) just after the round's updates were read: the window the race needs."""

    late: str | None = "b"

    def updates_for(self, job_id: str, round_no: int) -> list[UpdateRecord]:
        seen = super().updates_for(job_id, round_no)
        if self.late is not None:
            device, self.late = self.late, None
            record(self, device)
        return seen


def record(fl: FLStore, device: str) -> None:
    outcome = fl.record_update(
        JOB, 1, device, digest=digest(device), size=100, compression="int8", now=1.0
    )
    assert outcome == "accepted"


@dataclass
class EndedTask:
    """A train task that ended with its result (the task repository's view of it)."""

    terminal: bool = True
    result_id: str | None = "r"


@dataclass
class Result:
    id: str
    device_id: str
    status: str
    output: dict[str, Any]


class Tasks:
    def get_task(self, task_id: str) -> EndedTask:
        return EndedTask()

    def attempts(self, task_id: str) -> list[Any]:
        return []


class Results:
    def results_for(self, task_id: str) -> list[Result]:
        device = task_id.removeprefix("task-")
        out = TrainOutput(
            job=JOB,
            round=1,
            update=UpdateRef(digest=digest(device), size=100, compression="int8"),
            examples=10,
            steps=1,
            loss_before=1.0,
            loss_after=0.5,
            accuracy_before=0.5,
            accuracy=0.6,
            update_norm=1.0,
            train_s=0.1,
            upload_s=0.1,
            fetch_s=0.1,
            weights_cached=False,
        )
        return [Result(f"r-{device}", device, "succeeded", msgspec.to_builtins(out))]


@pytest.fixture
def fl(tmp_path: Path) -> Iterator[UploadDuringRead]:
    store = Store.open(f"sqlite:///{tmp_path / 'c.db'}", sqlite_synchronous="normal")
    store.create_schema(tables.metadata)
    fl = UploadDuringRead(store.engine)
    fl.create_job(JOB, "digits", SPEC, 0.0)
    fl.open_round(
        JOB,
        1,
        selected=list(DEVICES),
        tokens={d: f"tok-{d}" for d in DEVICES},
        tasks={d: f"task-{d}" for d in DEVICES},
        selection={},
        base_digest="0" * 64,
        started_at=0.0,
        deadline=60.0,
    )
    yield fl
    store.close()


def test_an_update_recorded_while_the_round_is_read_counts(fl: UploadDuringRead) -> None:
    record(fl, "a")
    job = fl.get_job(JOB)
    state = JobState(fl, job, lease=None)  # type: ignore[arg-type]
    progress = RoundProgress(fl, Tasks(), Results(), state)  # type: ignore[arg-type]
    rnd = fl.get_round(JOB, 1)
    assert rnd is not None
    got = asyncio.run(progress.read(rnd))
    # Before the fix: complete 1 and finished (b's task had ended with a result), so the
    # round closed with one of two updates.
    assert (got.complete, got.finished) == (2, True)
    assert {u.device_id: u.complete for u in fl.updates_for(JOB, 1)} == {"a": True, "b": True}
