"""Typed wire messages.

Every message is a frozen, keyword-only msgspec struct carrying a schema version ``v``, a
message ``id`` (stable across re-sends, so a receiver applies each message once) and the time
``ts`` it was created, plus a ``type`` tag that selects the struct on decode. New optional
fields may be added within a schema version; receivers ignore fields they do not know, so a
newer sender still talks to an older receiver. A change that breaks old receivers bumps
:data:`SCHEMA_VERSION`, and receivers refuse versions they do not speak.

New message types and new values of a literal field stay within a version when only a
receiver that asked for them can get them: :class:`TaskCancel` travels on the ``cancel``
channel, which an older agent ignores (it counts the message as on an unknown channel and
runs the task to its end), and a ``cancelled`` :class:`Result` answers only a cancel, so an
older coordinator, which sends none, never receives one.
"""

from __future__ import annotations

import os
import time
from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import Meta

SCHEMA_VERSION: Final = 1

# msgspec checks patterns with Python's ``re.search``; ``\Z`` (unlike ``$``) does not also match
# before a trailing newline, which would let "id\n" through.
MSG_ID_PATTERN: Final = r"\A[A-Za-z0-9._:-]+\Z"
NAME_PATTERN: Final = r"\A[A-Za-z0-9._:/-]+\Z"
MAX_ID_LENGTH: Final = 64

MsgId = Annotated[str, Meta(min_length=1, max_length=MAX_ID_LENGTH, pattern=MSG_ID_PATTERN)]
Name = Annotated[str, Meta(min_length=1, max_length=64, pattern=NAME_PATTERN)]
ShortText = Annotated[str, Meta(max_length=256)]
LongText = Annotated[str, Meta(max_length=4096)]
Timestamp = Annotated[float, Meta(ge=0.0, le=1.0e11)]
NonNeg = Annotated[float, Meta(ge=0.0, le=1.0e18)]
# A benchmark figure in GFLOP/s or GOP/s: 1e7 (10 POP/s) is above any single device on the
# market, so a larger claim is refused at decode, on both sides, not believed.
MAX_BENCH_GOPS: Final = 1.0e7
BenchRate = Annotated[float, Meta(ge=0.0, le=MAX_BENCH_GOPS)]
Count = Annotated[int, Meta(ge=0, le=2**62)]
Labels = Annotated[list[Name], Meta(max_length=64)]
Params = Annotated[dict[Annotated[str, Meta(max_length=64)], Any], Meta(max_length=256)]
Counters = Annotated[dict[Annotated[str, Meta(max_length=96)], Count], Meta(max_length=256)]


def new_id() -> str:
    """A fresh 128-bit message id: time-ordered prefix (ms) + random suffix, hex."""
    return f"{int(time.time() * 1000):012x}{os.urandom(10).hex()}"


class _Msg(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", omit_defaults=False):
    v: Annotated[int, Meta(ge=1, le=1_000)] = SCHEMA_VERSION
    id: MsgId = msgspec.field(default_factory=new_id)
    ts: Timestamp = msgspec.field(default_factory=time.time)


# ---------------------------------------------------------------- device -> cloud

#: What became of a device's last update (:class:`UpdateStatus.outcome`).
UpdateOutcome = Literal[
    "none",  # never updated since it was provisioned
    "staged",  # verified and handed to the installer
    "installing",
    "trial",  # the new version runs and must prove itself healthy
    "committed",
    "rolled_back",  # the new version failed its trial; the old slot runs again
    "install_failed",  # the new slot could not be built; the old version never stopped
    "refused",  # the release failed a signature, version or class check
    "reverted",  # the operator asked for the previous slot back and it runs
]


class UpdateStatus(msgspec.Struct, frozen=True, kw_only=True):
    """A device's update state, sent in its birth message and on every change."""

    version: Annotated[str, Meta(max_length=32)]  # the running agent image ("" if none)
    outcome: UpdateOutcome = "none"
    target: Annotated[str, Meta(max_length=32)] = ""  # the version the outcome is about
    reason: ShortText = ""
    slot: Literal["a", "b", ""] = ""
    floor: Annotated[str, Meta(max_length=32)] = ""
    task_id: MsgId | None = None
    at: Timestamp = 0.0


class State(_Msg, frozen=True, kw_only=True, tag="state"):
    """Birth (``online``, retained) and Last Will (``offline``, retained) of an agent."""

    state: Literal["online", "offline"]
    agent_version: ShortText = ""
    device_class: Name | None = None
    runtimes: Labels = msgspec.field(default_factory=list)
    reason: ShortText | None = None
    started_at: Timestamp | None = None
    # Agent images (lepton.protocol.releases): absent from agents that predate them.
    update: UpdateStatus | None = None


class Cpu(msgspec.Struct, frozen=True, kw_only=True):
    count: Annotated[int, Meta(ge=1, le=4096)]
    percent: Annotated[float, Meta(ge=0.0, le=100.0)] = 0.0
    load1: NonNeg = 0.0
    freq_mhz: Annotated[list[NonNeg], Meta(max_length=4096)] = msgspec.field(default_factory=list)
    arch: ShortText = ""


class Memory(msgspec.Struct, frozen=True, kw_only=True):
    total: Count
    available: Count


class Disk(msgspec.Struct, frozen=True, kw_only=True):
    total: Count
    free: Count


class Network(msgspec.Struct, frozen=True, kw_only=True):
    bytes_sent: Count = 0
    bytes_recv: Count = 0
    # Bytes/s over the last report interval, when a previous sample exists.
    tx_rate: NonNeg | None = None
    rx_rate: NonNeg | None = None


class Thermal(msgspec.Struct, frozen=True, kw_only=True):
    temperature_c: Annotated[float, Meta(ge=-100.0, le=300.0)] | None = None
    throttled: bool = False
    # Raw ``vcgencmd get_throttled`` bits on a Raspberry Pi; None elsewhere.
    throttle_flags: Count | None = None
    source: ShortText = ""


class Battery(msgspec.Struct, frozen=True, kw_only=True):
    percent: Annotated[float, Meta(ge=0.0, le=100.0)]
    plugged: bool | None = None


class Bench(msgspec.Struct, frozen=True, kw_only=True):
    """Start-up micro-benchmark: measured throughput of this device, cached per boot."""

    fp32_gflops: BenchRate
    int8_gops: BenchRate | None = None
    runtime: ShortText = ""
    measured_at: Timestamp = 0.0


class Slots(msgspec.Struct, frozen=True, kw_only=True):
    total: Count
    busy: Count = 0
    queued: Count = 0


class CapacityReport(_Msg, frozen=True, kw_only=True, tag="capacity"):
    """What a device can do right now. Sent periodically (QoS 0) and on significant change."""

    device_model: ShortText = ""
    device_class: Name | None = None
    cpu: Cpu
    memory: Memory
    disk: Disk | None = None
    network: Network | None = None
    thermal: Thermal = msgspec.field(default_factory=Thermal)
    battery: Battery | None = None
    accelerators: Labels = msgspec.field(default_factory=list)
    runtimes: Labels = msgspec.field(default_factory=list)
    bench: Bench | None = None
    slots: Slots
    outbox_pending: Count = 0
    interval_s: Annotated[float, Meta(gt=0.0, le=86_400.0)] = 30.0
    uptime_s: NonNeg = 0.0
    counters: Counters = msgspec.field(default_factory=dict)
    tags: Labels = msgspec.field(default_factory=list)
    # Names of the local data sources this device holds (data locality for training tasks).
    data_sources: Labels = msgspec.field(default_factory=list)
    # Samples in each local data source whose size the agent knows (it learns a size when
    # the source is first loaded for a task). A federated round bounds the example count a
    # device claims by the size it reported for the job's data source before the round.
    data_sizes: Annotated[dict[Name, Count], Meta(max_length=64)] = msgspec.field(
        default_factory=dict
    )


#: ``cancelled``: the task was stopped by a :class:`TaskCancel` (before it started or between
#: the steps of its handler); the coordinator records such a result and applies none.
TaskStatus = Literal["succeeded", "failed", "rejected", "expired", "cancelled"]
#: Machine-readable causes of a failed result after which the task is run nowhere again:
#: ``crashed_agent`` (the task was running each time its agent died, up to the agent's crash
#: limit) would crash every device it went to next.
FailureReason = Literal["crashed_agent"]
FINAL_FAILURES: Final[frozenset[str]] = frozenset({"crashed_agent"})


class TaskAck(_Msg, frozen=True, kw_only=True, tag="task-ack"):
    """The agent took a task into its queue (``accepted``) or refused it with a reason."""

    task_id: MsgId
    accepted: bool
    reason: ShortText | None = None


class Result(_Msg, frozen=True, kw_only=True, tag="result"):
    """Outcome of one task attempt. ``id`` is the result id a receiver deduplicates on."""

    task_id: MsgId
    status: TaskStatus
    attempt: Annotated[int, Meta(ge=1, le=1_000)] = 1
    output: Params = msgspec.field(default_factory=dict)
    error: LongText | None = None
    # Set with some failures (``FailureReason``); receivers that predate it ignore it.
    reason: FailureReason | None = None
    started_at: Timestamp | None = None
    finished_at: Timestamp | None = None


# ---------------------------------------------------------------- cloud -> device


class Task(_Msg, frozen=True, kw_only=True, tag="task"):
    """A unit of work for one device. Never run after ``expires_at``."""

    task_id: MsgId
    kind: Name
    params: Params = msgspec.field(default_factory=dict)
    expires_at: Timestamp
    attempt: Annotated[int, Meta(ge=1, le=1_000)] = 1


class ResultAck(_Msg, frozen=True, kw_only=True, tag="result-ack"):
    """The coordinator durably applied these results; the agent may drop them from its outbox."""

    ids: Annotated[list[MsgId], Meta(min_length=1, max_length=1_000)]


#: Most task ids one :class:`TaskCancel` names (a round's stragglers, a stopped job's tasks
#: on one device, are far fewer).
MAX_CANCEL_IDS: Final = 1_000


class TaskCancel(_Msg, frozen=True, kw_only=True, tag="task-cancel"):
    """Stop these tasks (on ``cmd/{device}/cancel``, QoS 1): a queued one at once, a running
    one at its handler's next check; each ends with a ``cancelled`` result. Ids the device
    does not hold (unknown, or finished already) are ignored, so a re-send is harmless."""

    task_ids: Annotated[list[MsgId], Meta(min_length=1, max_length=MAX_CANCEL_IDS)]
    reason: ShortText = ""


Message = State | CapacityReport | TaskAck | Result | Task | ResultAck | TaskCancel
MESSAGE_TYPES: Final[tuple[type[Message], ...]] = (
    State,
    CapacityReport,
    TaskAck,
    Result,
    Task,
    ResultAck,
    TaskCancel,
)
