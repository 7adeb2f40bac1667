"""The TaskCancel message and the ``cancelled`` result status on the wire: bounded, and
invisible to what older receivers already decode."""

from __future__ import annotations

import msgspec
import pytest

from lepton.protocol import topics
from lepton.protocol.codec import decode, encode
from lepton.protocol.errors import DecodeError
from lepton.protocol.messages import MAX_CANCEL_IDS, Result, Task, TaskCancel


def test_a_cancel_round_trips_on_its_own_channel() -> None:
    msg = TaskCancel(task_ids=["t-1", "t-2"], reason="round_closed")
    assert decode(encode(msg), TaskCancel) == msg
    assert topics.cmd_topic("f", "dev-1", topics.CANCEL) == "lepton/v1/f/cmd/dev-1/cancel"
    assert topics.parse("lepton/v1/f/cmd/dev-1/cancel").channel == topics.CANCEL
    # A cancel is no task: a receiver expecting one refuses it by type.
    with pytest.raises(DecodeError) as info:
        decode(encode(msg), Task)
    assert info.value.reason == "unexpected_type"


@pytest.mark.parametrize(
    "ids",
    [[], [f"t{i}" for i in range(MAX_CANCEL_IDS + 1)], ["bad/id"], ["x" * 65], ["t\n"]],
    ids=["empty", "too-many", "slash", "too-long", "newline"],
)
def test_a_cancel_outside_its_bounds_is_refused(ids: list[str]) -> None:
    wire = msgspec.msgpack.encode(
        {"v": 1, "type": "task-cancel", "id": "m1", "ts": 1.0, "task_ids": ids}
    )
    with pytest.raises(DecodeError) as info:
        decode(wire)
    assert info.value.reason == "invalid"
    assert len(encode(TaskCancel(task_ids=["x" * 64] * MAX_CANCEL_IDS))) < 100_000


def test_a_cancelled_result_and_the_statuses_before_it() -> None:
    for status in ("succeeded", "failed", "rejected", "expired", "cancelled"):
        r = Result(task_id="t-1", status=status, error=None)  # type: ignore[arg-type]
        assert decode(encode(r), Result).status == status
    wire = msgspec.msgpack.encode(
        {"v": 1, "type": "result", "id": "r1", "ts": 1.0, "task_id": "t", "status": "paused"}
    )
    with pytest.raises(DecodeError):
        decode(wire)
