"""One task request: what a submitter asks for, the same struct from the CLI to the database.

The CLI builds a :class:`TaskRequest` and posts it as JSON; the API reads its body into one
(:class:`~lepton.coordinator.api.schemas.TaskSubmit` is the same fields for the OpenAPI schema, and
a test keeps the two alike); :func:`~lepton.coordinator.tasks.submit.build_task` turns it into the
stored :class:`~lepton.coordinator.store.NewTask`; the federated engine submits its train tasks
as requests too. Adding a task field means a field here (and in ``TaskSubmit``), then in the
store's records and table, which the scheduler's ``TaskSpec.from_record`` reads.

``params`` is plain JSON: for a kind of :data:`~lepton.protocol.tasks.TaskKind` it is checked
against that kind's parameter struct at submission, so the device never refuses it for its shape;
other kinds (a plugin's, say) pass as they are.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import Meta

NAME_PATTERN: Final = r"^[A-Za-z0-9._:/-]+$"
IDENT_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._:-]*$"
MAX_BYTES: Final = 2**53
MAX_EXPIRY_S: Final = 30 * 86400.0

Name = Annotated[str, Meta(min_length=1, max_length=64, pattern=NAME_PATTERN)]
Ident = Annotated[str, Meta(min_length=1, max_length=64, pattern=IDENT_PATTERN)]
Bytes = Annotated[int, Meta(ge=0, le=MAX_BYTES)]


class TaskRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A task to run somewhere in the fleet. Only ``kind`` is required."""

    kind: Annotated[Name, Meta(description='What to run, e.g. "echo" or "benchmark".')]
    params: Annotated[dict[str, Any], Meta(description="Arguments for the kind.")] = {}
    id: Annotated[Ident | None, Meta(description="Task id; generated when omitted.")] = None
    model_class: Annotated[Name, Meta(description="Throughput class for the estimator.")] = (
        "generic"
    )
    precision: Literal["fp32", "int8"] = "fp32"
    demand_gops: Annotated[float, Meta(ge=0, le=1e12, description="Compute demand, GOP.")] = 1.0
    input_bytes: Bytes = 0
    output_bytes: Bytes = 0
    memory_bytes: Bytes = 0
    runtime: Annotated[Name | None, Meta(description="Required runtime (hard filter).")] = None
    accelerator: Annotated[Name | None, Meta(description="Required accelerator.")] = None
    data_source: Annotated[Name | None, Meta(description="Data the device must hold.")] = None
    min_battery: Annotated[float, Meta(ge=0, le=100)] | None = None
    device_id: Annotated[Ident | None, Meta(description="Pin the task to one device.")] = None
    max_attempts: Annotated[int, Meta(ge=1, le=100)] | None = None
    expires_in_s: Annotated[
        Annotated[float, Meta(gt=0, le=MAX_EXPIRY_S)] | None,
        Meta(description="Start deadline, seconds from now."),
    ] = None

    def body(self) -> dict[str, Any]:
        """The JSON body of ``POST /v1/tasks``: ``kind``, ``params`` and the fields that differ
        from their defaults."""
        out: dict[str, Any] = msgspec.to_builtins(self)
        return {k: v for k, v in out.items() if k in _ALWAYS or v != _DEFAULTS.get(k, _NONE)}


_ALWAYS: Final = ("kind", "params")
_NONE: Final = object()
_DEFAULTS: Final[dict[str, Any]] = {
    f.name: f.default for f in msgspec.structs.fields(TaskRequest) if not f.required
}
