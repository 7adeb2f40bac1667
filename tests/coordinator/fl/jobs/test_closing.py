"""Which late updates a closing round folds in (``[late] policy = "fold"``), on a SQLite store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lepton.coordinator.fl import tables
from lepton.coordinator.fl.jobs.closing import RoundCloser
from lepton.coordinator.fl.jobs.progress import JobState, RoundProgress
from lepton.coordinator.fl.store import FLStore
from lepton.coordinator.store import Store

JOB = "digits-0000abcd"
SPEC: dict[str, Any] = {
    "name": "digits",
    "model": "lepton.models.digits:DigitsCNN",
    "data": "digits",
    "late": {"policy": "fold", "max_rounds": 2},
}
DEVICES = ["a", "b", "c", "d"]


class Rounds:
    """A job whose rounds open and close at chosen times, with updates recorded by hand."""

    def __init__(self, fl: FLStore) -> None:
        self.fl = fl

    def open(self, round_no: int, at: float) -> None:
        self.fl.open_round(
            JOB,
            round_no,
            selected=DEVICES,
            tokens={d: f"tok-{d}" for d in DEVICES},
            tasks={d: f"task-{round_no}-{d}" for d in DEVICES},
            selection={},
            base_digest="0" * 64,
            started_at=at,
            deadline=at + 60,
        )

    def close(self, round_no: int, at: float, aggregated: list[str]) -> None:
        assert self.fl.close_round(
            JOB,
            round_no,
            state="closed",
            now=at,
            contributors=aggregated,
            metrics={"aggregated": aggregated},
        )

    def upload(self, round_no: int, device: str, at: float, *, result: bool = True) -> None:
        outcome = self.fl.record_update(
            JOB,
            round_no,
            device,
            digest=f"{round_no}{device}".ljust(64, "0"),
            size=100,
            compression="int8",
            now=at,
            late_ok=True,
        )
        assert outcome == "accepted"
        if result:
            assert self.fl.link_result(
                JOB, round_no, device, result_id=f"r-{round_no}-{device}", examples=10, metrics={}
            )


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Rounds, RoundCloser]]:
    store = Store.open(f"sqlite:///{tmp_path / 'c.db'}", sqlite_synchronous="normal")
    store.create_schema()
    store.create_schema(tables.metadata)
    fl = FLStore(store.engine)
    record = fl.create_job(JOB, "digits", SPEC, 0.0)
    state = JobState(fl, record, lease=None)  # type: ignore[arg-type]
    # Folding reads rounds and links results: no blobs, job code or metrics.
    closing = RoundCloser(
        fl,
        None,  # type: ignore[arg-type]
        state=state,
        progress=RoundProgress(fl, store.tasks, store.results, state),
        code=None,  # type: ignore[arg-type]
        job_tasks=None,  # type: ignore[arg-type]
        policy=None,  # type: ignore[arg-type]
        metrics=None,  # type: ignore[arg-type]
    )
    yield Rounds(fl), closing
    store.close()


def folded(closing: RoundCloser, round_no: int) -> list[str]:
    return sorted(f"{u.device_id}@{r}" for r, u in closing.late_updates(round_no))


def test_late_updates_within_the_window_are_folded_once(
    setup: tuple[Rounds, RoundCloser],
) -> None:
    rounds, closing = setup
    rounds.open(1, at=0.0)
    rounds.upload(1, "a", at=1.0)
    rounds.upload(1, "b", at=1.5)
    rounds.close(1, at=2.0, aggregated=["a", "b"])
    rounds.open(2, at=2.0)
    rounds.upload(1, "c", at=3.0)  # one round late
    rounds.upload(1, "d", at=3.5, result=False)  # its result is not in yet
    assert folded(closing, 2) == ["c@1"]
    rounds.upload(2, "a", at=3.8)
    rounds.upload(2, "b", at=3.9)
    rounds.close(2, at=4.0, aggregated=["a", "b", "c@1"])
    rounds.open(3, at=4.0)
    # c@1 was folded by round 2: never again. d's result still missing.
    assert folded(closing, 3) == []
    rounds.upload(2, "c", at=5.0)
    assert folded(closing, 3) == ["c@2"]


def test_the_window_is_max_rounds_plus_a_result_that_lags_its_upload(
    setup: tuple[Rounds, RoundCloser],
) -> None:
    """max_rounds = 2: round 4 folds round 2's and 3's late updates, and round 1's only when
    the upload came before round 3 (its window's last round) closed, the result after."""
    rounds, closing = setup
    for n in (1, 2, 3):
        rounds.open(n, at=10.0 * n)
        if n == 1:
            rounds.upload(1, "a", at=11.0, result=False)  # uploaded in time, result lags
        if n == 3:
            rounds.upload(1, "b", at=35.0, result=False)  # two rounds late: inside the window
        rounds.close(n, at=10.0 * n + 9.0, aggregated=[])
    rounds.open(4, at=40.0)
    rounds.upload(1, "c", at=41.0)  # uploaded after round 3 closed: outside the window
    rounds.upload(2, "d", at=42.0)
    # The results come in now, while round 4 is open.
    for device in ("a", "b"):
        assert rounds.fl.link_result(
            JOB, 1, device, result_id=f"r-{device}", examples=5, metrics={}
        )
    assert folded(closing, 4) == ["a@1", "b@1", "d@2"]
    rounds.close(4, at=49.0, aggregated=["a@1", "b@1", "d@2"])
    rounds.open(5, at=50.0)
    assert folded(closing, 5) == []  # round 1 is out of reach; the rest were folded
