"""The round engine: runs federated jobs on the leader, one round at a time, crash-safe.

For each active job, one :class:`JobRunner` task (leader only, cancelled when the term ends):

1. **prepare** (once): build the model, write its first weights as a blob, record the
   tensor layout updates must match, the update size cap and the FLOPs per example;
2. **open** a round: choose devices (:mod:`.planning`), give each an upload token and a
   pinned ``train`` task (one attempt, expiring at the round's deadline), and record the
   round (selection, tokens, task ids, absolute deadline) before submitting the tasks;
3. **wait** until ``clients_per_round`` updates count, or the deadline passes with at least
   ``min_results`` (an update whose result is still on its way gets ``result_grace_s``
   more), or every selected device has finished. Waiting wakes on recorded uploads and
   applied results, with a slow re-check as a safety net for work another replica applied;
4. **close**: aggregate the counted updates with the job's strategy, write the new weights
   (and the strategy's state) as blobs, evaluate centrally, and in one transaction close
   the round and move the job on. A round short of ``min_results`` at its deadline is
   extended with more devices, up to ``max_round_attempts`` times; then the job fails;
5. at the end, **register** the final model (FP32 ONNX) in the model registry under the
   job's name, where it can be quantized and deployed like any other model.

An update counts once both its upload is recorded (``fl_updates``, written before the
device's upload is answered) and the device's train result, naming the same digest, has
been applied (written before the result is acknowledged). Neither is lost when the
coordinator dies: the upload is in the database, and the agent re-sends an unacknowledged
result. A restarted leader finds the open round in the database (selection, tokens,
deadline, updates so far), re-submits any task it had not submitted yet (task ids are
stable, so this is a no-op when it had), and carries on; UNIQUE(job, round, device) means a
device's update counts once however often it is sent. Late updates (their round closed)
are refused with 409 ``late`` and counted; strategies here aggregate one round's updates.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from coordinator.config import Config
from coordinator.errors import ConflictError, LeaseLostError, NotFoundError
from coordinator.federated import modelio, planning
from coordinator.federated.job import FLJob
from coordinator.federated.metrics import FLMetrics
from coordinator.federated.store import (
    ACTIVE_STATES,
    FLStore,
    JobRecord,
    RoundRecord,
    UpdateRecord,
)
from coordinator.federated.strategies import AggregationError, ClientUpdate, Strategy
from coordinator.federated.strategies.dp import CentralDP
from coordinator.models.registry import ModelRegistry
from coordinator.scheduler import CostModel, CostWeights, ThroughputEstimator
from coordinator.store import Lease, ResultOutcome, Store
from coordinator.submit import build_task
from protocol.errors import DecodeError
from protocol.weights import decode_weights, encode_weights

log = logging.getLogger(__name__)

RECHECK_S: Final = 2.0  # safety-net re-check while waiting (work applied by another replica)
NO_DEVICES_RECHECK_S: Final = 2.0
#: A job's update cap: this many times the FP32 weights blob, plus a margin.
UPDATE_CAP_FACTOR: Final = 1.25
UPDATE_CAP_MARGIN: Final = 64 << 10
MAX_DECODE_BYTES: Final = 1 << 32


class JobFailedError(Exception):
    """The job cannot go on (its model does not load, a round never got enough updates)."""


@dataclass
class _Progress:
    complete: int  # updates that count (upload and result)
    waiting: int  # uploads recorded whose result has not been applied yet
    finished: bool  # every selected device's task has ended


class FLEngine:
    """Runs every active federated job while this process leads (see module doc)."""

    def __init__(
        self,
        cfg: Config,
        store: Store,
        fl: FLStore,
        registry: ModelRegistry,
        metrics: FLMetrics,
        *,
        base_url: Callable[[], str],
        estimator: Callable[[], ThroughputEstimator],
        weights: CostWeights,
        on_submit: Callable[[], None] = lambda: None,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.fl = fl
        self.registry = registry
        self.metrics = metrics
        self.base_url = base_url
        self.estimator = estimator
        self.weights = weights
        self.on_submit = on_submit
        self._wake = asyncio.Event()
        self._runners: dict[str, JobRunner] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ waking

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def wake(self) -> None:
        """Re-check jobs and rounds soon (event loop thread)."""
        self._wake.set()
        for runner in self._runners.values():
            runner.wake()

    def wake_threadsafe(self) -> None:
        """:meth:`wake` from any thread (upload handlers, the result worker)."""
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self.wake)

    def on_results(self, outcomes: Sequence[ResultOutcome]) -> None:
        """Results were applied (worker thread): wake the rounds waiting on train tasks."""
        if any(o.outcome == "applied" and o.task_id.startswith("fl-") for o in outcomes):
            self.wake_threadsafe()

    def cost_model(self) -> CostModel:
        return CostModel(self.weights, self.estimator())

    # ------------------------------------------------------------------ leading

    async def lead(self, lease: Lease) -> None:
        """One term of leadership: a runner per active job, until the term ends."""
        self.bind(asyncio.get_running_loop())
        tasks: dict[str, asyncio.Task[None]] = {}
        try:
            while True:
                self._wake.clear()
                for job_id, task in list(tasks.items()):
                    if task.done():
                        del tasks[job_id]
                        self._runners.pop(job_id, None)
                        if not task.cancelled() and isinstance(task.exception(), LeaseLostError):
                            raise task.exception()  # type: ignore[misc]
                jobs = await asyncio.to_thread(self.fl.list_jobs, states=ACTIVE_STATES)
                for job in jobs:
                    if job.id not in tasks:
                        runner = JobRunner(self, job, lease)
                        self._runners[job.id] = runner
                        tasks[job.id] = asyncio.create_task(runner.run(), name=f"fl-{job.id}")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(5.0):
                        await self._wake.wait()
        finally:
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
            self._runners.clear()


class JobRunner:
    """Runs one job through its rounds (see module doc)."""

    def __init__(self, engine: FLEngine, record: JobRecord, lease: Lease) -> None:
        self.engine = engine
        self.fl = engine.fl
        self.store = engine.store
        self.registry = engine.registry
        self.lease = lease
        self.job_id = record.id
        self.record = record
        self.job = FLJob.from_mapping(record.spec)
        self.strategy: Strategy = self.job.build_strategy()
        self.global_weights: dict[str, np.ndarray[Any, Any]] | None = None
        self.global_size = 0
        self.eval_set: modelio.EvalSet | None = None
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    # ------------------------------------------------------------------ main loop

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                await self._run()
            except (LeaseLostError, asyncio.CancelledError):
                raise
            except JobFailedError as exc:
                log.error("fl job %s failed: %s", self.job_id, exc)  # noqa: TRY400 - no traceback
                await asyncio.to_thread(
                    self.fl.update_job,
                    self.job_id,
                    state="failed",
                    error=str(exc),
                    finished_at=time.time(),
                    lease=self.lease,
                )
                return
            except Exception:
                failures += 1
                delay = min(30.0, 0.5 * 2**failures)
                log.exception("fl job %s: error; retrying in %.1fs", self.job_id, delay)
                await asyncio.sleep(delay)
            else:
                return

    async def _run(self) -> None:
        record = await self._reload()
        if record.state == "pending":
            record = await self._prepare()
        await self._restore(record)
        while True:
            record = await self._reload()
            if record.state == "stopping":
                await self._stop(record)
                return
            if record.state != "running":
                return
            if record.round > self.job.rounds:
                await self._finish(record, state="done")
                return
            rnd = await asyncio.to_thread(self.fl.get_round, self.job_id, record.round)
            if rnd is None or rnd.state != "open":
                if rnd is not None and rnd.state == "closed":  # closed, job not moved on: heal
                    await asyncio.to_thread(
                        self.fl.update_job,
                        self.job_id,
                        round=record.round + 1,
                        global_digest=rnd.new_digest,
                        lease=self.lease,
                    )
                    continue
                rnd = await self._open(record)
                if rnd is None:
                    continue  # no devices yet, or a stop: look again
            else:
                await self._ensure_tasks(rnd)
            await self._play(rnd)

    async def _reload(self) -> JobRecord:
        self.record = await asyncio.to_thread(self.fl.get_job, self.job_id)
        return self.record

    # ------------------------------------------------------------------ set-up

    async def _prepare(self) -> JobRecord:
        job = self.job
        try:
            if job.initial_weights is not None:
                weights = await self._initial_weights(job.initial_weights)
            else:
                weights = await asyncio.to_thread(modelio.initial_weights, job.model, job.seed)
            shape = job.input_shape
            if job.eval is not None:
                self.eval_set = await asyncio.to_thread(modelio.load_eval_set, job.eval)
                shape = shape or tuple(self.eval_set.x.shape[1:])
            flops = await asyncio.to_thread(modelio.train_flops_per_example, job.model, shape)
        except modelio.ModelError as exc:
            raise JobFailedError(str(exc)) from exc
        blob = encode_weights(weights, kind="weights", round=0, job=self.job_id)
        digest = await asyncio.to_thread(self.registry.put_bytes, blob)
        cap = job.max_update_bytes or int(len(blob) * UPDATE_CAP_FACTOR) + UPDATE_CAP_MARGIN
        await asyncio.to_thread(
            self.fl.update_job,
            self.job_id,
            state="running",
            round=1,
            global_digest=digest,
            tensors={k: list(v.shape) for k, v in weights.items()},
            max_update_bytes=cap,
            flops_per_example=flops,
            lease=self.lease,
        )
        log.info(
            "fl job %s: %s on %r, %d rounds of %d; initial weights %s (%d bytes)",
            self.job_id,
            job.model,
            job.data,
            job.rounds,
            job.clients_per_round,
            digest[:12],
            len(blob),
        )
        return await self._reload()

    async def _restore(self, record: JobRecord) -> None:
        """Global weights, evaluation set and strategy state as the database has them."""
        assert record.global_digest is not None
        self.global_weights, self.global_size = await self._load_weights(record.global_digest)
        if self.job.eval is not None and self.eval_set is None:
            try:
                self.eval_set = await asyncio.to_thread(modelio.load_eval_set, self.job.eval)
            except modelio.ModelError as exc:
                raise JobFailedError(str(exc)) from exc
        rounds = await asyncio.to_thread(self.fl.list_rounds, self.job_id)
        closed = [r for r in rounds if r.state == "closed"]
        self.strategy = self.job.build_strategy()
        if closed and closed[-1].strategy_state and closed[-1].strategy_state.get("digest"):
            state, _ = await self._load_weights(closed[-1].strategy_state["digest"])
            self.strategy.load_state(state)

    async def _initial_weights(self, digest: str) -> dict[str, Any]:
        """The job's starting weights from the blob store, checked against its model."""
        try:
            weights, _ = await self._load_weights(digest)
        except NotFoundError as exc:
            raise JobFailedError(f"initial_weights: no blob {digest}") from exc
        except DecodeError as exc:
            raise JobFailedError(f"initial_weights: not a weights blob: {exc}") from exc
        await asyncio.to_thread(modelio.build_model, self.job.model, weights)  # ModelError
        return weights

    async def _load_weights(self, digest: str) -> tuple[dict[str, Any], int]:
        data = await asyncio.to_thread(self.registry.read_blob, digest)
        _meta, arrays = await asyncio.to_thread(decode_weights, data, max_bytes=MAX_DECODE_BYTES)
        return arrays, len(data)

    # ------------------------------------------------------------------ opening a round

    async def _open(self, record: JobRecord) -> RoundRecord | None:
        round_no = record.round
        chosen = await self._select(record, want=self.job.clients_per_round, exclude=frozenset())
        if chosen is None:
            return None
        devices, info = chosen
        now = time.time()
        tokens = {d: secrets.token_urlsafe(18) for d in devices}
        tasks = {d: planning.task_id(self.job_id, round_no, d) for d in devices}
        assert record.global_digest is not None
        rnd = await asyncio.to_thread(
            self.fl.open_round,
            self.job_id,
            round_no,
            selected=devices,
            tokens=tokens,
            tasks=tasks,
            selection=info,
            base_digest=record.global_digest,
            started_at=now,
            deadline=now + self.job.deadline_s,
            lease=self.lease,
        )
        log.info(
            "fl job %s round %d: %d devices selected (%s), deadline %.0fs",
            self.job_id,
            round_no,
            len(devices),
            self.job.selection,
            self.job.deadline_s,
        )
        await self._ensure_tasks(rnd)
        return rnd

    async def _select(
        self, record: JobRecord, *, want: int, exclude: frozenset[str], attempt: int = 1
    ) -> tuple[list[str], dict[str, Any]] | None:
        """Devices for the round (None while too few are eligible, re-checked on a timer)."""
        job = self.job
        shape = planning.RoundShape(
            weights_bytes=self.global_size,
            update_bytes=planning.expected_update_bytes(self.global_size, job.compression),
            flops_per_example=record.flops_per_example or 1.0,
        )

        def gather() -> tuple[list[Any], dict[str, str], int]:
            rows = self.store.list_devices(state="online", limit=1_000_000)
            states = planning.device_states(rows, self.store.inflight_by_device())
            rounds = self.fl.list_rounds(self.job_id)
            history = planning.participation(
                [(r.round, r.selected) for r in rounds if r.round < record.round], record.round
            )
            examples = self.fl.examples_by_device(self.job_id)
            cands, why = planning.candidates(
                job,
                shape,
                states,
                self.engine.cost_model(),
                examples=examples,
                history=history,
                exclude=exclude,
            )
            return cands, why, len(states)

        cands, why, online = await asyncio.to_thread(gather)
        need = 1 if exclude else job.needed
        if len(cands) < need:
            log.info(
                "fl job %s round %d: %d eligible of %d online devices (need %d); waiting",
                self.job_id,
                record.round,
                len(cands),
                online,
                need,
            )
            await self._sleep(NO_DEVICES_RECHECK_S)
            return None
        rng = np.random.default_rng([job.seed, record.round, attempt])
        picked = planning.choose(job, cands, min(want, len(cands)), rng)
        expected = {c.device_id: round(c.expected_s, 3) for c in cands}
        info = {
            "method": job.selection,
            "eligible": len(cands),
            "online": online,
            "expected_round_s": picked.expected_round_s,
            "expected_s": {d: expected[d] for d in picked.devices},
            "forced": picked.forced,
            "ineligible": why,
        }
        return picked.devices, info

    async def _ensure_tasks(self, rnd: RoundRecord) -> None:
        """Submit the round's train tasks not submitted yet (idempotent by task id)."""
        base = self.engine.base_url().rstrip("/")
        digest = rnd.base_digest
        knobs = self.strategy.configure_fit(rnd.round)
        examples = await asyncio.to_thread(self.fl.examples_by_device, self.job_id)
        flops = self.record.flops_per_example or 1.0
        submitted = 0
        for device, tid in rnd.tasks.items():
            try:
                await asyncio.to_thread(self.store.get_task, tid)
                continue
            except NotFoundError:
                pass
            now = time.time()
            if rnd.deadline <= now:
                continue
            params = planning.train_params(
                self.job,
                self.job_id,
                rnd.round,
                device,
                weights={
                    "digest": digest,
                    "size": self.global_size,
                    "url": f"{base}/v1/blobs/{digest}",
                },
                upload_url=f"{base}/v1/fl/uploads/{self.job_id}/{rnd.round}/{device}"
                f"?token={rnd.tokens[device]}",
                strategy_knobs=knobs,
            )
            spec = planning.task_spec(
                self.job,
                planning.RoundShape(
                    weights_bytes=self.global_size,
                    update_bytes=0,
                    flops_per_example=flops,
                ),
                examples.get(device, self.job.examples_hint),
                device,
            )
            task = build_task(
                self.engine.cfg,
                kind=planning.KIND,
                params=params,
                task_id=tid,
                model_class=spec.model_class,
                demand_gops=spec.demand_gops,
                input_bytes=spec.input_bytes,
                output_bytes=spec.output_bytes,
                runtime=spec.runtime,
                data_source=spec.data_source,
                min_battery=spec.min_battery,
                device_id=device,
                max_attempts=1,
                expires_in_s=rnd.deadline - now,
                now=now,
            )
            try:
                await asyncio.to_thread(self.store.submit, task)
                submitted += 1
            except ConflictError:
                pass
        if submitted:
            self.engine.on_submit()

    # ------------------------------------------------------------------ a round

    async def _play(self, rnd: RoundRecord) -> None:
        """Wait for the round's updates, then close, extend or fail it."""
        while True:
            outcome = await self._wait(rnd)
            if outcome == "stop":
                return  # the main loop sees the stop
            if outcome == "close":
                if await self._close(rnd):
                    return
                outcome = "short"  # the strategy could not aggregate what came
            extended = await self._extend(rnd)
            if extended is None:
                return
            rnd = extended

    async def _wait(self, rnd: RoundRecord) -> str:
        job = self.job
        while True:
            self._wake.clear()
            record = await self._reload()
            if record.state != "running":
                return "stop"
            progress = await self._progress(rnd)
            if progress.complete >= job.clients_per_round:
                return "close"
            now = time.time()
            grace_end = rnd.deadline + job.result_grace_s
            if now >= rnd.deadline or progress.finished:
                if progress.waiting and now < grace_end:
                    pass  # an uploaded update's result is on its way
                elif progress.complete >= job.needed:
                    return "close"
                elif progress.finished or now >= rnd.deadline:
                    return "short"
            until = rnd.deadline if now < rnd.deadline else grace_end
            await self._sleep(max(0.0, min(RECHECK_S, until - now)))

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()

    async def _progress(self, rnd: RoundRecord) -> _Progress:
        """Link results to recorded uploads; count what counts, and who is done.

        A device's result is looked up among every result stored for its task, applied or
        not: a task the coordinator took back (the device looked offline, say, as it does to
        a coordinator that just restarted) may still have run to the end on the device, and
        its update counts like any other. A device is done once its update counts, or its
        task ended for a reason the device gave (it failed, refused or expired the task); a
        task taken back from a device that went away is not done before the deadline.
        """

        def check() -> _Progress:
            updates = {u.device_id: u for u in self.fl.updates_for(self.job_id, rnd.round)}
            finished = True
            complete = waiting = 0
            for device, tid in rnd.tasks.items():
                up = updates.get(device)
                if up is not None and (up.complete or self._link(rnd.round, device, tid, up)):
                    complete += 1
                    continue
                if up is not None:
                    waiting += 1  # uploaded; its result is on its way
                    finished = False
                    continue
                try:
                    task = self.store.get_task(tid)
                except NotFoundError:
                    finished = False
                    continue
                gone = (task.last_error or "").startswith("device offline")
                if not task.terminal or (gone and task.result_id is None):
                    finished = False
            return _Progress(complete=complete, waiting=waiting, finished=finished)

        return await asyncio.to_thread(check)

    def _link(self, round_no: int, device: str, task_id: str, up: UpdateRecord) -> bool:
        """Attach the device's successful result naming ``up``'s digest (worker thread)."""
        for result in self.store.results_for(task_id):
            out = result.output or {}
            if result.device_id != device or result.status != "succeeded":
                continue
            if (out.get("update") or {}).get("digest") != up.digest:
                continue
            examples = out.get("examples")
            if isinstance(examples, bool) or not isinstance(examples, int) or examples < 1:
                continue
            metrics = {
                k: float(v)
                for k, v in out.items()
                if isinstance(v, (int, float))
                and not isinstance(v, bool)
                and k not in ("round", "examples", "steps")
            }
            self.fl.link_result(
                self.job_id,
                round_no,
                device,
                result_id=result.id,
                examples=examples,
                metrics=metrics,
            )
            return True
        return False

    async def _extend(self, rnd: RoundRecord) -> RoundRecord | None:
        """Ask more devices and move the deadline; fail the job after too many attempts."""
        job = self.job
        if rnd.attempt >= job.max_round_attempts:
            progress = await self._progress(rnd)
            await asyncio.to_thread(
                self.fl.close_round,
                self.job_id,
                rnd.round,
                state="failed",
                now=time.time(),
                metrics={"accepted": progress.complete, "needed": job.needed},
                lease=self.lease,
            )
            self.engine.metrics.rounds.labels("failed").inc()
            raise JobFailedError(
                f"round {rnd.round}: {progress.complete} of {job.needed} updates after "
                f"{rnd.attempt} attempts"
            )
        progress = await self._progress(rnd)
        want = max(1, job.clients_per_round - progress.complete)
        chosen = await self._select(
            self.record, want=want, exclude=frozenset(rnd.tokens), attempt=rnd.attempt + 1
        )
        devices: list[str] = chosen[0] if chosen else []
        tokens = {d: secrets.token_urlsafe(18) for d in devices}
        tasks = {d: planning.task_id(self.job_id, rnd.round, d) for d in devices}
        extended = await asyncio.to_thread(
            self.fl.extend_round,
            self.job_id,
            rnd.round,
            selected=devices,
            tokens=tokens,
            tasks=tasks,
            deadline=time.time() + job.deadline_s,
            lease=self.lease,
        )
        self.engine.metrics.rounds.labels("extended").inc()
        log.warning(
            "fl job %s round %d: %d of %d updates by the deadline; extended (attempt %d, "
            "%d more devices)",
            self.job_id,
            rnd.round,
            progress.complete,
            job.needed,
            extended.attempt,
            len(devices),
        )
        await self._ensure_tasks(extended)
        return extended

    async def _close(self, rnd: RoundRecord) -> bool:
        """Aggregate the round and record it; False if too few updates were usable."""
        assert self.global_weights is not None
        updates = await asyncio.to_thread(self.fl.updates_for, self.job_id, rnd.round)
        counted = sorted((u for u in updates if u.complete), key=lambda u: u.device_id)
        clients: list[ClientUpdate] = []
        unreadable: dict[str, str] = {}
        for u in counted:
            try:
                data = await asyncio.to_thread(self.registry.read_blob, u.digest)
                _meta, delta = await asyncio.to_thread(
                    decode_weights, data, max_bytes=MAX_DECODE_BYTES
                )
            except (DecodeError, NotFoundError, OSError) as exc:
                unreadable[u.device_id] = f"unreadable: {exc}"
                continue
            assert u.examples is not None
            clients.append(
                ClientUpdate(
                    device_id=u.device_id,
                    delta=delta,
                    num_examples=u.examples,
                    metrics=u.metrics or {},
                )
            )
        before = self.strategy.state()
        try:
            result = await asyncio.to_thread(self.strategy.aggregate, self.global_weights, clients)
        except AggregationError as exc:
            log.warning("fl job %s round %d: %s", self.job_id, rnd.round, exc)
            return False
        try:
            return await self._commit(rnd, result, counted, unreadable)
        except BaseException:
            self.strategy.load_state(before)  # not committed: the round is aggregated again
            raise

    async def _commit(
        self, rnd: RoundRecord, result: Any, counted: Sequence[Any], unreadable: dict[str, str]
    ) -> bool:
        job = self.job
        blob = encode_weights(result.weights, kind="weights", round=rnd.round, job=self.job_id)
        digest = await asyncio.to_thread(self.registry.put_bytes, blob)
        state_ref: dict[str, Any] = {}
        if result.state:
            state_blob = encode_weights(dict(result.state), kind="weights", round=rnd.round)
            state_ref["digest"] = await asyncio.to_thread(self.registry.put_bytes, state_blob)
        now = time.time()
        metrics: dict[str, Any] = {
            "selected": len(rnd.selected),
            "accepted": len(counted),
            "contributors": len(result.contributors),
            "rejected_updates": {**result.rejected, **unreadable},
            "upload_rejects": dict(rnd.rejects),
            "rejected": sum(rnd.rejects.values()) + len(result.rejected) + len(unreadable),
            "examples": result.num_examples,
            "bytes_up": sum(u.size for u in counted),
            "bytes_down": self.global_size * len(rnd.selected),
            "wall_s": now - rnd.started_at,
            "attempts": rnd.attempt,
            "expected_round_s": (rnd.selection or {}).get("expected_round_s"),
            **{k: v for k, v in result.metrics.items() if math.isfinite(v)},
        }
        if "client.loss_after" in result.metrics:
            metrics["loss"] = result.metrics["client.loss_after"]
        if self.eval_set is not None:
            loss, accuracy = await asyncio.to_thread(
                modelio.evaluate, job.model, result.weights, self.eval_set
            )
            metrics["loss"], metrics["accuracy"] = loss, accuracy
        if isinstance(self.strategy, CentralDP) and job.dp is not None:
            eligible = max(1, int((rnd.selection or {}).get("eligible") or len(rnd.selected)))
            metrics["dp.epsilon"] = self.strategy.epsilon(
                delta=job.dp.delta, sampling_rate=min(1.0, job.clients_per_round / eligible)
            )
        closed = await asyncio.to_thread(
            self.fl.close_round,
            self.job_id,
            rnd.round,
            state="closed",
            now=now,
            new_digest=digest,
            strategy_state=state_ref,
            contributors=result.contributors,
            metrics=_jsonable(metrics),
            job_values={"round": rnd.round + 1, "global_digest": digest},
            lease=self.lease,
        )
        if not closed:
            return True  # closed already (an earlier term): the main loop reloads
        self.global_weights, self.global_size = dict(result.weights), len(blob)
        self.engine.metrics.rounds.labels("closed").inc()
        self.engine.metrics.round_seconds.observe(metrics["wall_s"])
        log.info(
            "fl job %s round %d closed: %d updates (%d selected), %.1fs%s",
            self.job_id,
            rnd.round,
            len(counted),
            len(rnd.selected),
            metrics["wall_s"],
            f", accuracy {metrics['accuracy']:.4f}" if "accuracy" in metrics else "",
        )
        return True

    # ------------------------------------------------------------------ the end

    async def _stop(self, record: JobRecord) -> None:
        rnd = await asyncio.to_thread(self.fl.get_round, self.job_id, record.round)
        if rnd is not None and rnd.state == "open":
            await asyncio.to_thread(
                self.fl.close_round,
                self.job_id,
                rnd.round,
                state="cancelled",
                now=time.time(),
                lease=self.lease,
            )
            self.engine.metrics.rounds.labels("cancelled").inc()
        await self._finish(record, state="stopped", register=record.round > 1)

    async def _finish(self, record: JobRecord, *, state: str, register: bool = True) -> None:
        """Register the final model (when asked) and end the job."""
        final: dict[str, Any] | None = record.final_model
        if register and final is None:
            final = await self._register(record)
        await asyncio.to_thread(
            self.fl.update_job,
            self.job_id,
            state=state,
            final_model=final,
            finished_at=time.time(),
            lease=self.lease,
        )
        log.info("fl job %s %s; final model %s", self.job_id, state, final)

    async def _register(self, record: JobRecord) -> dict[str, Any]:
        job = self.job
        assert self.global_weights is not None
        assert record.global_digest is not None
        weights = self.global_weights
        shape = job.input_shape
        accuracy: float | None = None
        samples: int | None = None
        if self.eval_set is not None:
            shape = shape or tuple(self.eval_set.x.shape[1:])
            _loss, accuracy = await asyncio.to_thread(
                modelio.evaluate, job.model, weights, self.eval_set
            )
            samples = len(self.eval_set)

        def write_and_import() -> dict[str, Any]:
            with tempfile.TemporaryDirectory(prefix="lepton-fl-") as tmp:
                path, fmt = modelio.write_final_model(
                    job.model, weights, Path(tmp), fmt=job.final_format, sample_shape=shape
                )
                rec = self.registry.import_file(
                    path,
                    name=job.name,
                    format="onnx" if fmt == "onnx" else "torch",
                    precision="fp32",
                    accuracy_fp32=accuracy,
                    eval_samples=samples,
                )
            return {
                "name": rec.name,
                "version": rec.version,
                "digest": rec.digest,
                "format": rec.format,
                "weights_digest": record.global_digest,
                "accuracy": accuracy,
            }

        return await asyncio.to_thread(write_and_import)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    return value
