"""Task submission: a :class:`~lepton.coordinator.tasks.request.TaskRequest` normalised into a
:class:`~lepton.coordinator.store.NewTask` at the edge.

Beyond field ranges (checked as the request is decoded), the params of a kind with a contract
must decode as its parameter struct, and a task must make a valid wire message: the
params must be plain data within the protocol's limits, and the encoded Task must fit the
message size limit with room to spare and decode with the codec the agent runs (its depth
limit included), so it can never be refused at dispatch time or on the device.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import Any, Final

import msgspec

from lepton.common.errors import LeptonError
from lepton.coordinator.config import Config
from lepton.coordinator.store import NewTask
from lepton.coordinator.tasks.request import TaskRequest
from lepton.protocol import codec
from lepton.protocol.errors import DecodeError
from lepton.protocol.messages import Task, new_id
from lepton.protocol.tasks import decode_params, is_kind

# Leave headroom under the codec limit for the attempt counter and fields added later.
MAX_TASK_BYTES: Final = codec.MAX_MESSAGE_BYTES - 4096


#: The request's fields a stored task keeps as they are (by name): a field added to both
#: TaskRequest and NewTask needs no line here.
COPIED: Final = tuple(
    f.name
    for f in dataclasses.fields(NewTask)
    if f.name in TaskRequest.__struct_fields__
    and f.name not in ("id", "kind", "params", "max_attempts")
)


class SubmissionError(LeptonError, ValueError):
    """The submission cannot become a task; ``field`` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


def request_of(data: Mapping[str, Any]) -> TaskRequest:
    """``data`` (a decoded JSON body, say) as a :class:`TaskRequest`; :class:`SubmissionError`
    names the field that breaks it."""
    try:
        return msgspec.convert(data, TaskRequest)
    except msgspec.ValidationError as exc:
        raise SubmissionError(_field_of(str(exc)), str(exc)) from exc


def build_task(cfg: Config, req: TaskRequest, *, now: float | None = None) -> NewTask:
    """Validate a request against the wire contract and return the task to store.

    The params of a kind with a contract (:data:`~lepton.protocol.tasks.TaskKind`) must decode
    as that kind's parameter struct, as the agent will decode them; a
    :class:`SubmissionError` names the field (``params.<name>``). They are stored as given.
    """
    now = time.time() if now is None else now
    expires_at = now + (
        cfg.tasks.default_expiry_s if req.expires_in_s is None else req.expires_in_s
    )
    tid = req.id or new_id()
    if is_kind(req.kind):
        try:
            decode_params(req.kind, req.params)
        except msgspec.ValidationError as exc:
            raise SubmissionError(_params_field(str(exc)), str(exc)) from exc
    try:
        message = msgspec.convert(
            {
                "task_id": tid,
                "kind": req.kind,
                "params": req.params,
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
        kind=req.kind,
        params=message.params,
        pinned_device=req.device_id,
        max_attempts=cfg.tasks.max_attempts if req.max_attempts is None else req.max_attempts,
        expires_at=expires_at,
        created_at=now,
        **{name: getattr(req, name) for name in COPIED},
    )


def _params_field(message: str) -> str:
    # msgspec says "... - at `$.batch_size`", or "Object missing required field `round`"
    if "`$." in message:
        name = message.split("`$.", 1)[1].split("`", 1)[0].split(".", 1)[0].split("[", 1)[0]
        return f"params.{name}"
    if "missing required field `" in message:
        return "params." + message.split("missing required field `", 1)[1].split("`", 1)[0]
    return "params"


def _field_of(message: str) -> str:
    # msgspec says "... - at `$.params.x`"
    if "`$." in message:
        return message.split("`$.", 1)[1].split("`", 1)[0].split(".", 1)[0].split("[", 1)[0]
    return "task"
