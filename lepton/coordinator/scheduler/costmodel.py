"""The cost of running a task on a device: expected completion time plus weighted side costs.

For task *j* on device *i*::

    queue_s    = expected wait before a lane of i is free (backlog spread over its lanes)
    compute_s  = demand_j / rate_i(model_class_j, precision_j)      (estimator, GOP/s per lane)
    transfer_s = 8 * (input_bytes_j + output_bytes_j) / bandwidth_bps_i
    rtt_s      = round trip to i
    energy     = compute_s * power_w_i + transfer_s * radio_power_w            (joules)
    battery    = (compute_s + transfer_s) * 100 / battery_percent_i            (unplugged only)
    total      = w.time * (queue_s + compute_s + transfer_s + rtt_s)
                 + w.energy * energy + w.battery * battery

``battery`` is busy time on battery, scaled up as the charge falls: a device at 50 % pays
twice what it pays at 100 %. Hard filters (offline, pinned, slots, runtime, accelerator,
data, memory, thermal, battery) take a pair out before any cost is compared.

:meth:`CostModel.components` is the vectorised hot path the solvers use: the lane processing
time ``proc`` (compute + transfer + round trip) of every pair, the per-device queue wait, and
the weighted side costs, with ``inf`` where a filter applies.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from lepton.coordinator.scheduler.estimator import ThroughputEstimator
from lepton.coordinator.scheduler.filters import (
    REASONS,
    FilterReasons,
    battery_floor,
    battery_level,
    reason,
    thermal_ok,
)
from lepton.coordinator.scheduler.types import DeviceState, TaskSpec
from lepton.coordinator.scheduler.weights import CostWeights

__all__ = [
    "REASONS",
    "CostComponents",
    "CostModel",
    "CostTerms",
    "CostWeights",
    "FilterReasons",
    "ThroughputEstimator",
]

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True, kw_only=True)
class CostTerms:
    """The cost of one (task, device) pair, term by term (seconds, joules, see module doc)."""

    queue_s: float
    compute_s: float
    transfer_s: float
    rtt_s: float
    energy: float
    battery: float
    total: float
    rate_gops: float = 0.0

    @property
    def completion_s(self) -> float:
        """Expected completion time when the task is the next one the device starts."""
        return self.queue_s + self.compute_s + self.transfer_s + self.rtt_s


@dataclass(frozen=True, slots=True)
class CostComponents:
    """Everything a solver needs about a batch, as arrays over (tasks, devices).

    ``proc[j, i]`` is the time task j occupies one lane of device i (``inf`` when filtered
    out), ``queue[i]`` the wait before a lane of i is free, ``lanes[i]`` its parallel lanes,
    and ``extra[j, i]`` the weighted energy and battery cost (``None`` when both weights are
    zero). Placing j as the k-th task from the end of a lane of i adds
    ``time_weight * (k * proc[j, i] + queue[i]) + extra[j, i]`` to the total cost.
    """

    proc: FloatArray
    queue: FloatArray
    lanes: IntArray
    extra: FloatArray | None
    time_weight: float
    placeable_rows: BoolArray | None = None  # cached: tasks with at least one feasible device

    @property
    def shape(self) -> tuple[int, int]:
        n, m = self.proc.shape
        return int(n), int(m)

    @property
    def feasible(self) -> BoolArray:
        return np.isfinite(self.proc)

    @property
    def placeable(self) -> BoolArray:
        """Tasks with at least one feasible device."""
        if self.placeable_rows is not None:
            return self.placeable_rows
        n, m = self.shape
        if m == 0:
            return np.zeros(n, dtype=bool)
        return np.asarray(np.isfinite(self.proc).any(axis=1), dtype=bool)

    def position_costs(self) -> tuple[FloatArray, FloatArray]:
        """``(P, R)``: the cost of j at position k on i is ``k * P[j, i] + R[j, i]``.

        ``R`` is ``(n, m)`` when there are side costs, else ``(m,)`` (broadcast over tasks).
        """
        w = self.time_weight
        if w == 1.0:
            p = self.proc
        elif w == 0.0:  # keep inf (filtered) apart from 0 (free): inf * 0 is nan
            p = np.where(np.isfinite(self.proc), 0.0, np.inf)
        else:
            p = self.proc * w
        r = self.queue * w
        if self.extra is not None:
            return p, self.extra + r[None, :]
        return p, r

    def standalone(self) -> FloatArray:
        """Total cost of each pair when the task is the next one its device starts."""
        p, r = self.position_costs()
        return p + r if r.ndim == 2 else p + r[None, :]


@dataclass(frozen=True, slots=True)
class _Devices:
    index: dict[str, int]
    ok: BoolArray  # device-level filters passed (online, slots, thermal)
    mem: FloatArray
    battery_level: FloatArray  # percent for unplugged battery devices, inf otherwise
    lanes: IntArray
    queue: FloatArray
    inv_bw: FloatArray  # seconds per byte
    rtt: FloatArray
    power: FloatArray
    drain: FloatArray  # battery multiplier, 0 on mains


# Requirements that decide, with memory, which devices a task may use:
# (pinned device, runtime, accelerator, data source, battery floor).
_Key = tuple[str | None, str | None, str | None, str | None, float]


@dataclass(frozen=True, slots=True)
class _Tasks:
    demand: FloatArray
    nbytes: FloatArray
    memory: FloatArray
    group_of: IntArray  # index into groups
    key_of: IntArray  # index into keys
    groups: list[tuple[str, str]]  # (model_class, precision)
    keys: list[_Key]


class CostModel:
    """Costs and hard filters of (task, device) pairs under one set of weights."""

    def __init__(self, weights: CostWeights, estimator: ThroughputEstimator) -> None:
        self.weights = weights
        self.estimator = estimator

    # ------------------------------------------------------------------ one pair

    def feasible(self, task: TaskSpec, device: DeviceState) -> str | None:
        """``None`` when the device may run the task, else the first filter that removes it
        (one of :data:`REASONS`)."""
        return reason(task, device, self.weights)

    def queue_s(self, device: DeviceState) -> float:
        """Expected wait before a lane of ``device`` can start new work."""
        lanes = device.lanes
        if device.backlog_s is not None:
            return device.backlog_s / lanes
        unit = self.weights.backlog_task_s
        wait = device.queued * unit / lanes
        if device.slots_busy > 0 and device.slots_total - device.slots_busy <= 0:
            wait += unit / 2  # a running task is, on average, half done
        return wait

    def power_w(self, device: DeviceState) -> float:
        if device.power_w is not None:
            return device.power_w
        cls = device.device_class
        if cls is not None and cls in self.weights.power_w_by_class:
            return self.weights.power_w_by_class[cls]
        return self.weights.default_power_w

    def terms(
        self, task: TaskSpec, device: DeviceState, *, queue_s: float | None = None
    ) -> CostTerms:
        """Cost terms of ``task`` on ``device`` (filters are not applied; see :meth:`feasible`).

        ``queue_s`` overrides the device's own expected wait, e.g. with the wait a plan gives.
        """
        w = self.weights
        rate = self.estimator.rate(device, task.model_class, task.precision)
        compute = task.demand_gops / rate if rate > 0 else float("inf")
        transfer = 8.0 * (task.input_bytes + task.output_bytes) / device.bandwidth_bps
        queue = self.queue_s(device) if queue_s is None else queue_s
        energy = compute * self.power_w(device) + transfer * w.radio_power_w
        battery = (compute + transfer) * self._drain(device)
        total = w.time * (queue + compute + transfer + device.rtt_s)
        if w.energy:
            total += w.energy * energy
        if w.battery:
            total += w.battery * battery
        return CostTerms(
            queue_s=queue,
            compute_s=compute,
            transfer_s=transfer,
            rtt_s=device.rtt_s,
            energy=energy,
            battery=battery,
            total=total,
            rate_gops=rate,
        )

    # ------------------------------------------------------------------ whole batch

    def matrix(
        self, tasks: Sequence[TaskSpec], devices: Sequence[DeviceState]
    ) -> tuple[FloatArray, FilterReasons]:
        """``(cost, reasons)``: ``cost[j, i]`` is ``terms(tasks[j], devices[i]).total``, or
        ``inf`` where a filter applies; ``reasons[j, i]`` names that filter."""
        comps = self.components(tasks, devices)
        return comps.standalone(), FilterReasons(self.weights, tasks, devices)

    def components(
        self, tasks: Sequence[TaskSpec], devices: Sequence[DeviceState]
    ) -> CostComponents:
        """Vectorised cost components of every (task, device) pair; see :class:`CostComponents`.

        Tasks with the same requirements share one device mask, and the matrices are filled
        in row blocks that stay in cache: 10,000 tasks on 1,000 devices take about 0.15 s on
        one core.
        """
        n, m = len(tasks), len(devices)
        dev = self._device_arrays(devices)
        w = self.weights
        tk = self._task_arrays(tasks)
        demand, nbytes, memory = tk.demand, tk.nbytes, tk.memory
        inv_rate = np.empty((len(tk.groups), m))
        for g, (mc, prec) in enumerate(tk.groups):
            rate = np.asarray(self.estimator.rates(devices, mc, prec), dtype=float)
            with np.errstate(divide="ignore"):
                inv_rate[g] = np.where(rate > 0, 1.0 / rate, np.inf)
        allowed = self._key_masks(tk.keys, devices, dev)
        check_memory = bool(np.any(memory > 0))
        has_bytes = bool(np.any(nbytes))
        side = (w.energy > 0) or (w.battery > 0 and bool(np.any(dev.drain)))
        per_compute = w.energy * dev.power + w.battery * dev.drain
        per_transfer = w.energy * w.radio_power_w + w.battery * dev.drain
        proc = np.empty((n, m))
        extra = np.empty((n, m)) if side else None
        placeable = np.zeros(n, dtype=bool)
        block = max(1, (1 << 19) // max(m, 1))  # ~4 MB of float64 per block
        for a in range(0, n, block):
            b = min(a + block, n)
            c = proc[a:b]
            np.take(inv_rate, tk.group_of[a:b], axis=0, out=c)
            c *= demand[a:b, None]
            bad = ~allowed[tk.key_of[a:b]]
            if check_memory:
                bad |= memory[a:b, None] > dev.mem[None, :]
            if m:
                placeable[a:b] = ~bad.all(axis=1)
            if extra is not None:
                e = extra[a:b]
                np.multiply(c, per_compute, out=e)
            if has_bytes:
                transfer = np.multiply.outer(nbytes[a:b], dev.inv_bw)
                c += transfer
                if extra is not None:
                    e += transfer * per_transfer
            c += dev.rtt
            np.putmask(c, bad, np.inf)
            if extra is not None:
                np.putmask(e, bad, np.inf)
        return CostComponents(
            proc=proc,
            queue=dev.queue,
            lanes=dev.lanes,
            extra=extra,
            time_weight=w.time,
            placeable_rows=placeable,
        )

    def _task_arrays(self, tasks: Sequence[TaskSpec]) -> _Tasks:
        """One pass over the tasks: numbers, the rate group and the requirement key."""
        n = len(tasks)
        groups: dict[tuple[str, str], int] = {}
        keys: dict[_Key, int] = {}
        demand, nbytes, memory = np.empty(n), np.empty(n), np.empty(n)
        group_of = np.empty(n, dtype=np.int64)
        key_of = np.empty(n, dtype=np.int64)
        for j, t in enumerate(tasks):
            demand[j] = t.demand_gops
            nbytes[j] = t.input_bytes + t.output_bytes
            memory[j] = t.memory_bytes
            group_of[j] = groups.setdefault((t.model_class, t.precision), len(groups))
            key = (
                t.device_id,
                t.runtime,
                t.accelerator,
                t.data_source,
                battery_floor(t, self.weights),
            )
            key_of[j] = keys.setdefault(key, len(keys))
        return _Tasks(demand, nbytes, memory, group_of, key_of, list(groups), list(keys))

    def _key_masks(
        self,
        keys: list[_Key],
        devices: Sequence[DeviceState],
        dev: _Devices,
    ) -> BoolArray:
        """Devices allowed for each requirement key (pin, runtime, accelerator, data, floor);
        memory is checked per task."""
        m = len(devices)
        held: dict[tuple[str, str], BoolArray] = {}

        def has(attr: str, value: str) -> BoolArray:
            got = held.get((attr, value))
            if got is None:
                got = np.fromiter((value in getattr(d, attr) for d in devices), np.bool_, m)
                held[(attr, value)] = got
            return got

        out = np.empty((len(keys), m), dtype=bool)
        for k, (pin, runtime, accel, data, floor) in enumerate(keys):
            mask = dev.ok & (dev.battery_level >= floor)
            if pin is not None:
                only = np.zeros(m, dtype=bool)
                if pin in dev.index:
                    only[dev.index[pin]] = True
                mask &= only
            if runtime is not None:
                mask &= has("runtimes", runtime)
            if accel is not None:
                mask &= has("accelerators", accel)
            if data is not None:
                mask &= has("data_sources", data)
            out[k] = mask
        return out

    def reason_codes(
        self,
        tasks: Sequence[TaskSpec],
        devices: Sequence[DeviceState],
        rows: Sequence[int] | None = None,
    ) -> npt.NDArray[np.uint8]:
        """Filter codes for ``rows`` of the batch (0 feasible, k: ``REASONS[k - 1]``)."""
        return FilterReasons(self.weights, tasks, devices).codes(rows)

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _drain(device: DeviceState) -> float:
        level = battery_level(device)
        return 0.0 if level == float("inf") else 100.0 / max(level, 1.0)

    def _device_arrays(self, devices: Sequence[DeviceState]) -> _Devices:
        m = len(devices)

        def arr(values: Iterable[float]) -> FloatArray:
            return np.fromiter(values, np.float64, m)

        ok = np.fromiter(
            (d.online and d.slots_total > 0 and thermal_ok(d, self.weights) for d in devices),
            np.bool_,
            m,
        )
        level = arr(battery_level(d) for d in devices)
        return _Devices(
            index={d.device_id: i for i, d in enumerate(devices)},
            ok=ok,
            mem=arr(d.mem_available for d in devices),
            battery_level=level,
            lanes=np.fromiter((d.lanes for d in devices), np.int64, m),
            queue=arr(self.queue_s(d) for d in devices),
            inv_bw=arr(8.0 / d.bandwidth_bps for d in devices),
            rtt=arr(d.rtt_s for d in devices),
            power=arr(self.power_w(d) for d in devices),
            drain=np.where(np.isinf(level), 0.0, 100.0 / np.maximum(level, 1.0)),
        )
