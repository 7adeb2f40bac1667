"""Who trains in a round, and the train tasks they get.

Eligible devices are the online ones whose latest capacity report passes the cost model's
hard filters for a ``train`` task of the job: the job's data source, the ``torch`` runtime,
a free slot, thermal state and battery floor. Each gets an expected round time from the
cost model (download the global weights, train ``examples x epochs`` examples at the rate
the throughput estimator learned for ``fl-train`` work on that device, upload the update),
and its participation record in the job; :func:`~.selection.select_clients` (or the
:func:`~.selection.uniform_random` baseline) then picks the round's devices.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgspec
import numpy as np

from lepton.coordinator.fl.jobs.spec import FLJob
from lepton.coordinator.fl.kernels.selection import (
    Candidate,
    Fairness,
    Selection,
    expected_round_time,
    select_clients,
    uniform_random,
)
from lepton.coordinator.scheduler import CostModel, DeviceState, TaskSpec
from lepton.coordinator.store import DeviceRecord
from lepton.coordinator.tasks.request import TaskRequest
from lepton.protocol.messages import CapacityReport
from lepton.protocol.tasks import (
    TRAIN,
    TrainOutput,
    TrainParams,
    UploadRef,
    WeightsRef,
    encode_params,
)

MODEL_CLASS: Final = "fl-train"
RUNTIME: Final = "torch"
KIND: Final = TRAIN


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundShape:
    """What a round's tasks cost: global weights down, an update up, FLOPs per example."""

    weights_bytes: int
    update_bytes: int
    flops_per_example: float


def expected_update_bytes(weights_bytes: int, compression: str) -> int:
    """Rough size of one update: the weights' size, halved for fp16, quartered for int8."""
    factor = {"fp32": 1.0, "fp16": 0.5, "int8": 0.27}.get(compression, 1.0)
    return int(weights_bytes * factor)


def demand_gops(job: FLJob, examples: int, flops_per_example: float) -> float:
    """Compute demand of one device's local training, GFLOP."""
    n = min(examples, job.max_examples) if job.max_examples else examples
    return max(n, 1) * job.epochs * flops_per_example / 1e9


def task_spec(job: FLJob, shape: RoundShape, examples: int, device_id: str | None) -> TaskSpec:
    """The cost model's view of one device's train task."""
    return TaskSpec(
        task_id=f"fl-{device_id or 'any'}",
        kind=KIND,
        model_class=MODEL_CLASS,
        demand_gops=demand_gops(job, examples, shape.flops_per_example),
        input_bytes=shape.weights_bytes,
        output_bytes=expected_update_bytes(shape.weights_bytes, job.compression),
        runtime=RUNTIME,
        data_source=job.data,
        min_battery=job.min_battery,
        device_id=device_id,
    )


def train_request(
    job: FLJob,
    shape: RoundShape,
    examples: int,
    params: TrainParams,
    *,
    task_id: str,
    device_id: str,
    expires_in_s: float,
) -> TaskRequest:
    """The request of one device's train task: its params, and the cost model's view of it
    (:func:`task_spec`) for the scheduler. One attempt: a round does not wait for a retry."""
    spec = task_spec(job, shape, examples, device_id)
    return TaskRequest(
        kind=KIND,
        params=encode_params(KIND, params),
        id=task_id,
        model_class=spec.model_class,
        demand_gops=spec.demand_gops,
        input_bytes=spec.input_bytes,
        output_bytes=spec.output_bytes,
        runtime=spec.runtime,
        data_source=spec.data_source,
        min_battery=spec.min_battery,
        device_id=device_id,
        max_attempts=1,
        expires_in_s=expires_in_s,
    )


def device_states(rows: Sequence[DeviceRecord], inflight: Mapping[str, int]) -> list[DeviceState]:
    """The scheduler's view of online devices with a capacity report."""
    out: list[DeviceState] = []
    for row in rows:
        if row.report is None or row.state != "online":
            continue
        try:
            report = msgspec.convert(row.report, CapacityReport)
        except msgspec.ValidationError:
            continue
        load = max(report.slots.busy + report.slots.queued, inflight.get(row.id, 0))
        busy = min(load, report.slots.total)
        out.append(DeviceState.from_capacity(row.id, report, slots_busy=busy, queued=load - busy))
    return out


def reported_sizes(rows: Sequence[DeviceRecord], data: str) -> dict[str, int]:
    """device -> samples its latest capacity report gives for the data source ``data``;
    devices that give none are left out (their updates keep the other bounds only)."""
    out: dict[str, int] = {}
    for row in rows:
        sizes = (row.report or {}).get("data_sizes")
        n = sizes.get(data) if isinstance(sizes, dict) else None
        # Reports were validated at ingest; a row written otherwise is skipped, not trusted.
        if isinstance(n, int) and not isinstance(n, bool) and n >= 0:
            out[row.id] = n
    return out


def candidates(
    job: FLJob,
    shape: RoundShape,
    devices: Sequence[DeviceState],
    model: CostModel,
    *,
    examples: Mapping[str, int],
    history: Mapping[str, tuple[int, int | None]],
    exclude: frozenset[str] = frozenset(),
    backlog: Mapping[str, float] | None = None,
) -> tuple[list[Candidate], dict[str, str]]:
    """Eligible devices with their expected round times, and why the others are not.

    ``examples``: the local examples each device last reported (others: the median of
    those known, else the job's ``examples_hint``); ``history``: device -> (times selected,
    rounds since last selected or None); ``backlog``: device -> seconds until it is
    expected to finish the job's earlier train tasks it still holds (:func:`backlog_s`). A
    device's new task waits behind those, so it is expected to start no earlier; the cost
    model's own wait (a fixed guess per queued task) stands where it is longer.
    """
    known = sorted(examples.values())
    default = known[len(known) // 2] if known else job.examples_hint
    out: list[Candidate] = []
    why: dict[str, str] = {}
    for d in devices:
        if d.device_id in exclude:
            continue
        spec = task_spec(job, shape, examples.get(d.device_id, default), d.device_id)
        reason = model.feasible(spec, d)
        if reason is not None:
            why[d.device_id] = reason
            continue
        held = (backlog or {}).get(d.device_id)
        queue = None if held is None else max(held, model.queue_s(d))
        expected = model.terms(spec, d, queue_s=queue).completion_s
        if not math.isfinite(expected):
            why[d.device_id] = "no_rate"
            continue
        times, since = history.get(d.device_id, (0, None))
        out.append(
            Candidate(
                device_id=d.device_id,
                expected_s=expected,
                participations=times,
                rounds_since=since,
            )
        )
    return out, why


def past_the_job(job: FLJob, cands: Sequence[Candidate], want: int, round_no: int) -> set[str]:
    """Candidates whose update no round is expected to count any more (not to be asked).

    Only for jobs that fold late updates: the round closes on its ``want`` fastest updates
    (expected at the ``want``-th smallest expected time, the round's length), and a slower
    device's update counts when it comes before the closing of round ``round_no +
    late.max_rounds`` or of the job's last round, whichever is first. A device expected
    after that would train for nothing. At least ``want`` candidates always stay.
    """
    if job.late.policy != "fold" or len(cands) <= want:
        return set()
    round_s = expected_round_time([c.expected_s for c in cands], want)
    reach = min(job.late.max_rounds, job.rounds - round_no) + 1
    return {c.device_id for c in cands if c.expected_s > reach * round_s}


def choose(
    job: FLJob, cands: Sequence[Candidate], want: int, rng: np.random.Generator
) -> Selection:
    """The round's devices: cost-model selection with fairness, or uniform random.

    Both ask ``ceil(want * (1 + over_select))`` devices, so the comparison isolates the
    choice of devices from over-selection.
    """
    if job.selection == "random":
        n = math.ceil(want * (1.0 + job.over_select))
        picked = uniform_random(cands, n, rng)
        return Selection(
            devices=picked.devices,
            target=want,
            expected_round_s=picked.expected_round_s,
            shortfall=max(0, want - len(picked.devices)),
        )
    f = job.fairness
    return select_clients(
        cands,
        want,
        over_select=job.over_select,
        fairness=Fairness(
            max_staleness=f.max_staleness,
            max_forced_share=f.max_forced_share,
            penalty=f.penalty,
        ),
        rng=rng,
    )


def backlog_s(
    inflight: Mapping[str, Sequence[tuple[float, float | None]]], now: float
) -> dict[str, float]:
    """device -> seconds until its in-flight train tasks of the job are expected done.

    ``inflight``: device -> (round start, expected seconds recorded at selection, or None)
    of each task it still holds. Each estimate already counted the wait behind the tasks
    before it, so the latest expected end is the backlog; a task past its expected end
    counts as ending now (its device is late, by how much is not known).
    """
    out: dict[str, float] = {}
    for device, tasks in inflight.items():
        ends = [start + expected for start, expected in tasks if expected is not None]
        out[device] = max([0.0, *(end - now for end in ends)])
    return out


def participation(
    rounds: Sequence[tuple[int, Sequence[str]]],
    current: int,
    *,
    working: Collection[str] = (),
) -> dict[str, tuple[int, int | None]]:
    """device -> (times selected, rounds since it was last selected) over earlier rounds.

    ``working``: devices still training for an earlier round of the job. They count as
    just selected (0 rounds since), so the staleness floor does not ask them again while
    they work: the new task would queue behind the old one, and usually expire there.
    """
    out: dict[str, tuple[int, int | None]] = {}
    for round_no, selected in sorted(rounds):
        for device in selected:
            times, _ = out.get(device, (0, None))
            out[device] = (times + 1, round_no)
    return {
        d: (n, 0 if d in working else current - last if last is not None else None)
        for d, (n, last) in out.items()
    }


def task_id(job_id: str, round_no: int, device_id: str) -> str:
    """A stable task id per (job, round, device): submitting it again is a no-op."""
    h = hashlib.sha256(f"{job_id}\x00{round_no}\x00{device_id}".encode()).hexdigest()
    return f"fl-{h[:28]}"


def seed_for(job: FLJob, round_no: int, device_id: str) -> int:
    """A per (job seed, round, device) training seed."""
    h = hashlib.sha256(f"{job.seed}\x00{round_no}\x00{device_id}".encode()).digest()
    return int.from_bytes(h[:7], "big")


def train_params(
    job: FLJob,
    job_id: str,
    round_no: int,
    device_id: str,
    *,
    weights: WeightsRef,
    upload_url: str,
    strategy_knobs: Mapping[str, Any],
) -> TrainParams:
    """The ``train`` task's params (:class:`~lepton.protocol.tasks.TrainParams` documents each);
    :func:`~lepton.protocol.tasks.encode_params` makes the task's ``params`` of them."""
    return TrainParams(
        job=job_id,
        round=round_no,
        model=job.model,
        weights=weights,
        data=job.data,
        upload=UploadRef(url=upload_url),
        epochs=job.epochs,
        batch_size=job.batch_size,
        lr=job.lr,
        optimizer=job.optimizer,
        momentum=job.momentum,
        compression=job.compression,
        seed=seed_for(job, round_no, device_id),
        max_examples=job.max_examples,
        prox_mu=float(strategy_knobs.get("prox_mu", 0.0)),
    )


#: The figures of a train result the job keeps per device and round (its counts and its
#: identity are kept apart).
TRAIN_METRICS: Final = (
    "loss_before",
    "loss_after",
    "accuracy_before",
    "accuracy",
    "update_norm",
    "train_s",
    "upload_s",
    "fetch_s",
)


def train_metrics(out: TrainOutput) -> dict[str, float]:
    """A train result's figures (:data:`TRAIN_METRICS`), as floats."""
    return {name: float(getattr(out, name)) for name in TRAIN_METRICS}
