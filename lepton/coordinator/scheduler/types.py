"""What the scheduler sees: devices and tasks as plain, immutable values.

The coordinator service normalises its registry rows and pending tasks into these two types at
the edge (see :meth:`DeviceState.from_capacity`); everything in the scheduler package is pure
code over them, with no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from lepton.protocol.messages import CapacityReport

Precision = Literal["fp32", "int8"]


class StoredTask(Protocol):
    """What :meth:`TaskSpec.from_record` reads of a stored task (the store's ``TaskRecord``)."""

    @property
    def id(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def model_class(self) -> str: ...
    @property
    def precision(self) -> str: ...
    @property
    def demand_gops(self) -> float: ...
    @property
    def input_bytes(self) -> int: ...
    @property
    def output_bytes(self) -> int: ...
    @property
    def memory_bytes(self) -> int: ...
    @property
    def runtime(self) -> str | None: ...
    @property
    def accelerator(self) -> str | None: ...
    @property
    def data_source(self) -> str | None: ...
    @property
    def min_battery(self) -> float | None: ...
    @property
    def pinned_device(self) -> str | None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceState:
    """A device as the scheduler sees it at the moment a batch is planned.

    Throughput figures come from the agent's start-up micro-benchmark and describe the whole
    device; a device running ``slots_total`` tasks at once shares them between its lanes.
    ``bandwidth_bps`` is in bits per second. ``backlog_s`` and ``power_w`` are optional: the
    expected seconds of work already committed to the device, and its draw under load; when
    unset the cost model estimates them from ``queued``/``slots_busy`` and the configured
    power table.
    """

    device_id: str
    online: bool = True
    device_class: str | None = None
    cpu_count: int = 1
    mem_available: int = 0
    fp32_gflops: float = 0.0
    int8_gops: float | None = None
    runtimes: frozenset[str] = frozenset()
    accelerators: frozenset[str] = frozenset()
    throttled: bool = False
    temperature_c: float | None = None
    battery_percent: float | None = None
    plugged: bool | None = None
    slots_total: int = 1
    slots_busy: int = 0
    queued: int = 0
    bandwidth_bps: float = 10e6
    rtt_s: float = 0.05
    data_sources: frozenset[str] = frozenset()
    tags: frozenset[str] = frozenset()
    backlog_s: float | None = None
    power_w: float | None = None

    def __post_init__(self) -> None:
        if self.slots_total < 0 or self.slots_busy < 0 or self.queued < 0:
            raise ValueError(f"device {self.device_id!r}: slot counts must be >= 0")
        if self.bandwidth_bps <= 0:
            raise ValueError(f"device {self.device_id!r}: bandwidth_bps must be > 0")
        if self.rtt_s < 0 or self.fp32_gflops < 0:
            raise ValueError(f"device {self.device_id!r}: rtt_s and fp32_gflops must be >= 0")

    @property
    def lanes(self) -> int:
        """Parallel lanes a new batch can use: the free slots, or every slot once all are busy
        (new work then waits for a running task to finish)."""
        free = self.slots_total - self.slots_busy
        return free if free > 0 else max(self.slots_total, 1)

    @classmethod
    def from_capacity(cls, device_id: str, report: CapacityReport, **overrides: Any) -> DeviceState:
        """Build the scheduler's view from a capacity report.

        The report says nothing about the link to the coordinator or local data sets, so
        ``bandwidth_bps`` and ``rtt_s`` keep their defaults unless given in
        ``overrides``; ``overrides`` also win over any field read from the report (``online``
        for a device whose Last Will arrived, for instance). An unknown key is a ``TypeError``.
        """
        fields: dict[str, Any] = {
            "device_id": device_id,
            "device_class": report.device_class,
            "cpu_count": report.cpu.count,
            "mem_available": report.memory.available,
            "runtimes": frozenset(report.runtimes),
            "accelerators": frozenset(report.accelerators),
            "throttled": report.thermal.throttled,
            "temperature_c": report.thermal.temperature_c,
            "slots_total": report.slots.total,
            "slots_busy": report.slots.busy,
            "queued": report.slots.queued,
            "tags": frozenset(report.tags),
            "data_sources": frozenset(report.data_sources),
        }
        if report.bench is not None:
            fields["fp32_gflops"] = report.bench.fp32_gflops
            fields["int8_gops"] = report.bench.int8_gops
        if report.battery is not None:
            fields["battery_percent"] = report.battery.percent
            fields["plugged"] = report.battery.plugged
        fields.update(overrides)
        return cls(**fields)


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskSpec:
    """One unit of work to place.

    ``demand_gops`` is the compute demand in GFLOP (fp32) or GOP (int8); ``input_bytes`` and
    ``output_bytes`` travel between the coordinator and the device. ``runtime``,
    ``accelerator`` and ``data_source`` are hard requirements; ``min_battery`` overrides the
    fleet-wide battery floor for this task; ``device_id`` pins the task to one device.
    """

    task_id: str
    kind: str
    model_class: str = "generic"
    precision: Precision = "fp32"
    demand_gops: float = 1.0
    input_bytes: int = 0
    output_bytes: int = 0
    memory_bytes: int = 0
    runtime: str | None = None
    accelerator: str | None = None
    data_source: str | None = None
    min_battery: float | None = None
    device_id: str | None = None

    @classmethod
    def from_record(cls, t: StoredTask) -> TaskSpec:
        """The cost model's view of a stored task."""
        return cls(
            task_id=t.id,
            kind=t.kind,
            model_class=t.model_class,
            precision="int8" if t.precision == "int8" else "fp32",
            demand_gops=t.demand_gops,
            input_bytes=t.input_bytes,
            output_bytes=t.output_bytes,
            memory_bytes=t.memory_bytes,
            runtime=t.runtime,
            accelerator=t.accelerator,
            data_source=t.data_source,
            min_battery=t.min_battery,
            device_id=t.pinned_device,
        )

    def __post_init__(self) -> None:
        if not self.demand_gops >= 0:  # also rejects NaN
            raise ValueError(f"task {self.task_id!r}: demand_gops must be >= 0")
        if self.input_bytes < 0 or self.output_bytes < 0 or self.memory_bytes < 0:
            raise ValueError(f"task {self.task_id!r}: byte counts must be >= 0")
        if self.precision not in ("fp32", "int8"):
            raise ValueError(f"task {self.task_id!r}: unknown precision {self.precision!r}")
