"""A job from start to end: prepare it once, play its rounds, register the final model.

:class:`JobRunner` holds the job's state (:class:`~.progress.JobState`) and the parts that
act on it, each built with what it uses: a :class:`~.opening.RoundOpener` (selection, train
tasks), a :class:`~.closing.RoundCloser` (aggregation, the round's figures), and the
shared :class:`~.progress.RoundProgress`, :class:`~.progress.JobCode` and
:class:`~.progress.JobTasks`.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from lepton.coordinator.config import Config
from lepton.coordinator.errors import LeaseLostError, NotFoundError
from lepton.coordinator.fl import modelio
from lepton.coordinator.fl.jobs.admission import JobPolicy
from lepton.coordinator.fl.jobs.closing import RoundCloser
from lepton.coordinator.fl.jobs.opening import RoundOpener
from lepton.coordinator.fl.jobs.progress import (
    JobCode,
    JobFailedError,
    JobState,
    JobTasks,
    RoundProgress,
    load_weights,
)
from lepton.coordinator.fl.jobs.spec import FLJob
from lepton.coordinator.fl.metrics import FLMetrics
from lepton.coordinator.fl.records import JobRecord, RoundRecord
from lepton.coordinator.fl.store import FLStore
from lepton.coordinator.model_registry.registry import ModelRegistry
from lepton.coordinator.scheduler import CostModel
from lepton.coordinator.store import Lease
from lepton.coordinator.store.cancels import CancelRepo
from lepton.coordinator.store.devices import DeviceRepo
from lepton.coordinator.store.results import ResultRepo
from lepton.coordinator.store.tasks import TaskRepo
from lepton.protocol.errors import DecodeError
from lepton.protocol.weights import encode_weights

log = logging.getLogger(__name__)

RECHECK_S: Final = 2.0  # safety-net re-check while waiting (work applied by another replica)
#: A job's update cap: this many times the FP32 weights blob, plus a margin.
UPDATE_CAP_FACTOR: Final = 1.25
UPDATE_CAP_MARGIN: Final = 64 << 10


class JobRunner:
    """Runs one job through its rounds (see :mod:`lepton.coordinator.fl.jobs.engine`)."""

    def __init__(
        self,
        record: JobRecord,
        lease: Lease,
        *,
        fl: FLStore,
        devices: DeviceRepo,
        tasks: TaskRepo,
        results: ResultRepo,
        cancels: CancelRepo,
        registry: ModelRegistry,
        cfg: Config,
        policy: JobPolicy,
        metrics: FLMetrics,
        planner: Callable[[], CostModel],
        urls: Callable[[], str],
        on_submit: Callable[[], None],
    ) -> None:
        self.fl = fl
        self.registry = registry
        self.policy = policy
        self.metrics = metrics
        self.state = state = JobState(fl, record, lease)
        self.code = JobCode(fl, policy, metrics, state)
        self.progress = RoundProgress(fl, tasks, results, state)
        self.job_tasks = JobTasks(fl, cancels, metrics, on_submit, state.job_id)
        self.opener = RoundOpener(
            fl,
            devices,
            tasks,
            planner,
            urls,
            cfg=cfg,
            metrics=metrics,
            state=state,
            progress=self.progress,
            job_tasks=self.job_tasks,
            on_submit=on_submit,
        )
        self.closer = RoundCloser(
            fl,
            registry,
            state=state,
            progress=self.progress,
            code=self.code,
            job_tasks=self.job_tasks,
            policy=policy,
            metrics=metrics,
        )

    @property
    def job_id(self) -> str:
        return self.state.job_id

    @property
    def job(self) -> FLJob:
        return self.state.job

    @property
    def lease(self) -> Lease:
        return self.state.lease

    def wake(self) -> None:
        self.state.wake()

    async def _reload(self) -> JobRecord:
        return await self.state.reload()

    async def _load_weights(self, digest: str) -> tuple[dict[str, Any], int]:
        return await load_weights(self.registry, digest)

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
                await self.job_tasks.cancel_all("job_failed")
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
        if record.state == "stopping" and record.global_digest is None:
            await self._finish(record, state="stopped", register=False)  # never started
            return
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
                rnd = await self.opener.open(record)
                if rnd is None:
                    continue  # no devices yet, or a stop: look again
            else:
                await self.opener.ensure_tasks(rnd)
            await self._play(rnd)

    async def _prepare(self) -> JobRecord:
        job = self.job
        policy = self.policy
        if job.initial_weights is not None:
            weights = await self._initial_weights(job.initial_weights)
        else:
            weights = await self.code.run(
                "initial_weights", modelio.initial_weights, job.model, policy, job.seed
            )
        shape = job.input_shape
        if job.eval is not None:
            eval_set = await self.code.run("eval_set", modelio.load_eval_set, job.eval, policy)
            self.state.eval_set = eval_set
            shape = shape or tuple(eval_set.x.shape[1:])
        flops = await self.code.run(
            "flops", modelio.train_flops_per_example, job.model, policy, shape
        )
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
        st = self.state
        st.global_weights, st.global_size = await self._load_weights(record.global_digest)
        if self.job.eval is not None and st.eval_set is None:
            st.eval_set = await self.code.run(
                "eval_set", modelio.load_eval_set, self.job.eval, self.policy
            )
        rounds = await asyncio.to_thread(self.fl.list_rounds, self.job_id)
        closed = [r for r in rounds if r.state == "closed"]
        st.strategy = self.job.build_strategy()
        if closed and closed[-1].strategy_state and closed[-1].strategy_state.get("digest"):
            state, _ = await self._load_weights(closed[-1].strategy_state["digest"])
            st.strategy.load_state(state)

    async def _initial_weights(self, digest: str) -> dict[str, Any]:
        """The job's starting weights from the blob store, checked against its model."""
        try:
            weights, _ = await self._load_weights(digest)
        except NotFoundError as exc:
            raise JobFailedError(f"initial_weights: no blob {digest}") from exc
        except DecodeError as exc:
            raise JobFailedError(f"initial_weights: not a weights blob: {exc}") from exc
        await self.code.run(
            "build_model", modelio.build_model, self.job.model, self.policy, weights
        )
        return weights

    # ------------------------------------------------------------------ a round

    async def _play(self, rnd: RoundRecord) -> None:
        """Wait for the round's updates, then close, extend or fail it."""
        while True:
            outcome = await self._wait(rnd)
            if outcome == "stop":
                return  # the main loop sees the stop
            # Closed, or short (a strategy that could not aggregate what came is short too).
            if outcome == "close" and await self.closer.close(rnd):
                return
            extended = await self.opener.extend(rnd)
            if extended is None:
                return
            rnd = extended

    async def _wait(self, rnd: RoundRecord) -> str:
        job = self.job
        while True:
            self.state.clear_wake()
            record = await self._reload()
            if record.state != "running":
                return "stop"
            progress = await self.progress.read(rnd)
            if progress.complete >= job.clients_per_round and not progress.forced_pending:
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
            await self.state.sleep(max(0.0, min(RECHECK_S, until - now)))

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
            self.metrics.rounds.labels("cancelled").inc()
        await self._finish(record, state="stopped", register=record.round > 1)

    async def _finish(self, record: JobRecord, *, state: str, register: bool = True) -> None:
        """Cancel the job's train tasks still going, register the final model (when asked)
        and end the job."""
        await self.job_tasks.cancel_all(f"job_{state}")
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
        """Register the final weights as the job's model, unless ``final_check`` finds them
        worse than where the job started or than the model last registered under its name
        (then the final model says ``registered: false`` and why)."""
        job = self.job
        policy = self.policy
        eval_set = self.state.eval_set
        assert self.state.global_weights is not None
        assert record.global_digest is not None
        weights = self.state.global_weights
        shape = job.input_shape
        accuracy: float | None = None
        samples: int | None = None
        if eval_set is not None:
            shape = shape or tuple(eval_set.x.shape[1:])
            _loss, final_accuracy = await self.code.run(
                "evaluate", modelio.evaluate, job.model, policy, weights, eval_set
            )
            accuracy, samples = final_accuracy, len(eval_set)
            refused = await self._final_check(final_accuracy) if job.final_check else None
            if refused is not None:
                self.metrics.screened.labels("final_model_worse").inc()
                log.warning("fl job %s: final model not registered: %s", self.job_id, refused)
                return {
                    "name": job.name,
                    "registered": False,
                    "reason": refused,
                    "weights_digest": record.global_digest,
                    "accuracy": accuracy,
                }

        def write_and_import() -> dict[str, Any]:
            with tempfile.TemporaryDirectory(prefix="lepton-fl-") as tmp:
                try:
                    path, fmt = modelio.write_final_model(
                        job.model,
                        policy,
                        weights,
                        Path(tmp),
                        fmt=job.final_format,
                        sample_shape=shape,
                    )
                except Exception:  # an export the model does not support: keep the weights
                    log.exception("fl job %s: ONNX export failed; saving a state dict", job.name)
                    path, fmt = modelio.write_final_model(
                        job.model, policy, weights, Path(tmp), fmt="torch", sample_shape=None
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

        return await self.code.run("final_model", write_and_import)

    async def _final_check(self, accuracy: float) -> str | None:
        """Why the final weights (``accuracy`` on the job's evaluation set) must not be
        registered, or None: they score below the job's starting weights on the same set,
        or below the latest model registered under the job's name (when that one was scored
        on a set of the same size, i.e. the same set)."""
        job = self.job
        eval_set = self.state.eval_set
        assert eval_set is not None
        rounds = await asyncio.to_thread(self.fl.list_rounds, self.job_id)
        if rounds:
            start, _ = await self._load_weights(rounds[0].base_digest)
            _loss, before = await self.code.run(
                "evaluate", modelio.evaluate, job.model, self.policy, start, eval_set
            )
            if accuracy < before:
                return f"final accuracy {accuracy:.4f} is below the starting weights' {before:.4f}"
        try:
            previous = await asyncio.to_thread(self.registry.get, job.name)
        except NotFoundError:
            return None
        if (
            previous.accuracy_fp32 is not None
            and previous.eval_samples == len(eval_set)
            and accuracy < previous.accuracy_fp32
        ):
            return (
                f"final accuracy {accuracy:.4f} is below {job.name} v{previous.version}'s "
                f"{previous.accuracy_fp32:.4f}"
            )
        return None
