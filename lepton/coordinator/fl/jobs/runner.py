"""A job from start to end: prepare it once, play its rounds, register the final model."""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Final

from lepton.coordinator.errors import LeaseLostError, NotFoundError
from lepton.coordinator.fl import modelio
from lepton.coordinator.fl.jobs.closing import RoundClosing
from lepton.coordinator.fl.jobs.opening import RoundOpening
from lepton.coordinator.fl.jobs.progress import JobFailedError
from lepton.coordinator.fl.records import JobRecord, RoundRecord
from lepton.protocol.errors import DecodeError
from lepton.protocol.weights import encode_weights

log = logging.getLogger(__name__)

RECHECK_S: Final = 2.0  # safety-net re-check while waiting (work applied by another replica)
#: A job's update cap: this many times the FP32 weights blob, plus a margin.
UPDATE_CAP_FACTOR: Final = 1.25
UPDATE_CAP_MARGIN: Final = 64 << 10


class JobRunner(RoundOpening, RoundClosing):
    """Runs one job through its rounds (see :mod:`lepton.coordinator.fl.jobs.engine`)."""

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
                await self._cancel_job_tasks("job_failed")
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
                rnd = await self._open(record)
                if rnd is None:
                    continue  # no devices yet, or a stop: look again
            else:
                await self._ensure_tasks(rnd)
            await self._play(rnd)

    async def _prepare(self) -> JobRecord:
        job = self.job
        policy = self.engine.policy
        if job.initial_weights is not None:
            weights = await self._initial_weights(job.initial_weights)
        else:
            weights = await self._run_code(
                "initial_weights", modelio.initial_weights, job.model, policy, job.seed
            )
        shape = job.input_shape
        if job.eval is not None:
            self.eval_set = await self._run_code(
                "eval_set", modelio.load_eval_set, job.eval, policy
            )
            shape = shape or tuple(self.eval_set.x.shape[1:])
        flops = await self._run_code(
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
        self.global_weights, self.global_size = await self._load_weights(record.global_digest)
        if self.job.eval is not None and self.eval_set is None:
            self.eval_set = await self._run_code(
                "eval_set", modelio.load_eval_set, self.job.eval, self.engine.policy
            )
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
        await self._run_code(
            "build_model", modelio.build_model, self.job.model, self.engine.policy, weights
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
            if outcome == "close" and await self._close(rnd):
                return
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
            await self._sleep(max(0.0, min(RECHECK_S, until - now)))

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
        """Cancel the job's train tasks still going, register the final model (when asked)
        and end the job."""
        await self._cancel_job_tasks(f"job_{state}")
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
        policy = self.engine.policy
        assert self.global_weights is not None
        assert record.global_digest is not None
        weights = self.global_weights
        shape = job.input_shape
        accuracy: float | None = None
        samples: int | None = None
        if self.eval_set is not None:
            shape = shape or tuple(self.eval_set.x.shape[1:])
            _loss, final_accuracy = await self._run_code(
                "evaluate", modelio.evaluate, job.model, policy, weights, self.eval_set
            )
            accuracy, samples = final_accuracy, len(self.eval_set)
            refused = await self._final_check(final_accuracy) if job.final_check else None
            if refused is not None:
                self.engine.metrics.screened.labels("final_model_worse").inc()
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

        return await self._run_code("final_model", write_and_import)

    async def _final_check(self, accuracy: float) -> str | None:
        """Why the final weights (``accuracy`` on the job's evaluation set) must not be
        registered, or None: they score below the job's starting weights on the same set,
        or below the latest model registered under the job's name (when that one was scored
        on a set of the same size, i.e. the same set)."""
        job = self.job
        assert self.eval_set is not None
        rounds = await asyncio.to_thread(self.fl.list_rounds, self.job_id)
        if rounds:
            start, _ = await self._load_weights(rounds[0].base_digest)
            _loss, before = await self._run_code(
                "evaluate", modelio.evaluate, job.model, self.engine.policy, start, self.eval_set
            )
            if accuracy < before:
                return f"final accuracy {accuracy:.4f} is below the starting weights' {before:.4f}"
        try:
            previous = await asyncio.to_thread(self.registry.get, job.name)
        except NotFoundError:
            return None
        if (
            previous.accuracy_fp32 is not None
            and previous.eval_samples == len(self.eval_set)
            and accuracy < previous.accuracy_fp32
        ):
            return (
                f"final accuracy {accuracy:.4f} is below {job.name} v{previous.version}'s "
                f"{previous.accuracy_fp32:.4f}"
            )
        return None
