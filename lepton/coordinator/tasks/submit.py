"""Task submission: a request normalised into a :class:`~lepton.coordinator.store.NewTask` at the
edge.

Beyond field ranges (checked by the API schema), a task must make a valid wire message: the
params must be plain data within the protocol's limits, and the encoded Task must fit the
message size limit with room to spare and decode with the codec the agent runs (its depth
limit included), so it can never be refused at dispatch time or on the device.
"""

from __future__ import annotations

import time
from typing import Any, Final, Literal

import msgspec

from lepton.common.errors import LeptonError
from lepton.coordinator.config import Config
from lepton.coordinator.store import NewTask
from lepton.protocol import codec
from lepton.protocol.errors import DecodeError
from lepton.protocol.messages import Task, new_id

# Leave headroom under the codec limit for the attempt counter and fields added later.
MAX_TASK_BYTES: Final = codec.MAX_MESSAGE_BYTES - 4096


class SubmissionError(LeptonError, ValueError):
    """The submission cannot become a task; ``field`` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


def build_task(
    cfg: Config,
    *,
    kind: str,
    params: dict[str, Any] | None = None,
    task_id: str | None = None,
    model_class: str = "generic",
    precision: Literal["fp32", "int8"] = "fp32",
    demand_gops: float = 1.0,
    input_bytes: int = 0,
    output_bytes: int = 0,
    memory_bytes: int = 0,
    runtime: str | None = None,
    accelerator: str | None = None,
    data_source: str | None = None,
    min_battery: float | None = None,
    device_id: str | None = None,
    max_attempts: int | None = None,
    expires_in_s: float | None = None,
    now: float | None = None,
) -> NewTask:
    """Validate a submission against the wire contract and return the task to store."""
    now = time.time() if now is None else now
    expires_at = now + (cfg.tasks.default_expiry_s if expires_in_s is None else expires_in_s)
    tid = task_id or new_id()
    try:
        message = msgspec.convert(
            {
                "task_id": tid,
                "kind": kind,
                "params": params or {},
                "expires_at": expires_at,
                "id": new_id(),
            },
            Task,
        )
    except msgspec.ValidationError as exc:
        raise SubmissionError(_field_of(str(exc)), str(exc)) from exc
    try:
        data = codec.encode(message)
    except (TypeError, ValueError, OverflowError) as exc:
        raise SubmissionError("params", f"not encodable as MessagePack: {exc}") from exc
    size = len(data)
    if size > MAX_TASK_BYTES:
        raise SubmissionError(
            "params",
            f"the task message would be {size} bytes; the limit is {MAX_TASK_BYTES}. "
            "Large inputs travel by content address over HTTP, not inside the task.",
        )
    try:
        # The receiving side's own check (depth, size, shape): what it would refuse, we do.
        codec.decode(data, Task)
    except DecodeError as exc:
        raise SubmissionError("params", f"the agent would refuse this task: {exc}") from exc
    return NewTask(
        id=tid,
        fleet=cfg.fleet,
        kind=kind,
        params=message.params,
        model_class=model_class,
        precision=precision,
        demand_gops=demand_gops,
        input_bytes=input_bytes,
        output_bytes=output_bytes,
        memory_bytes=memory_bytes,
        runtime=runtime,
        accelerator=accelerator,
        data_source=data_source,
        min_battery=min_battery,
        pinned_device=device_id,
        max_attempts=cfg.tasks.max_attempts if max_attempts is None else max_attempts,
        expires_at=expires_at,
        created_at=now,
    )


def _field_of(message: str) -> str:
    # msgspec says "... - at `$.params.x`"
    if "`$." in message:
        return message.split("`$.", 1)[1].split("`", 1)[0].split(".", 1)[0].split("[", 1)[0]
    return "task"
