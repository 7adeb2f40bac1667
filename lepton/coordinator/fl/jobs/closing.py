"""Closing a round: aggregate the updates that count, write the new weights and the
strategy's state, score them centrally, and record it all in one transaction.

With ``[late] policy = "fold"`` the round also aggregates late updates: complete updates
of the last ``late.max_rounds`` closed rounds that their own round did not aggregate and
no later round folded yet (and of the round before those, when the upload came before its
window's last round closed but the device's result only after), each named
``device@round`` and weighted by
:meth:`~.job.LateSpec.weight`. Which updates a round aggregated is recorded with it
(``aggregated`` in its metrics), in the same transaction, so a late update is folded once
even across a coordinator restart.

Without ``fold``, a closed round cancels the train tasks of its stragglers (reason
``round_closed``): nothing would take their updates. With it they run on, since a later
round may fold what they send; the job's end cancels whatever is left.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lepton.coordinator.errors import NotFoundError
from lepton.coordinator.fl import modelio
from lepton.coordinator.fl.jobs.admission import JobPolicy
from lepton.coordinator.fl.jobs.progress import (
    MAX_DECODE_BYTES,
    JobCode,
    JobState,
    JobTasks,
    RoundProgress,
)
from lepton.coordinator.fl.jobs.spec import FLJob
from lepton.coordinator.fl.kernels.screening import Screened, screen
from lepton.coordinator.fl.kernels.strategies import AggregationError, ClientUpdate
from lepton.coordinator.fl.kernels.strategies.dp import CentralDP
from lepton.coordinator.fl.metrics import FLMetrics
from lepton.coordinator.fl.records import RoundRecord, UpdateRecord
from lepton.coordinator.fl.store import FLStore
from lepton.coordinator.model_registry.registry import ModelRegistry
from lepton.protocol.errors import DecodeError
from lepton.protocol.weights import decode_weights, encode_weights

log = logging.getLogger(__name__)


class RoundCloser:
    """Aggregation and the round's figures, for one job. The strategy is the job's
    (``state.strategy``, restored from its last closed round by the runner); new weights
    and strategy state go to ``blobs``."""

    def __init__(
        self,
        fl: FLStore,
        blobs: ModelRegistry,
        *,
        state: JobState,
        progress: RoundProgress,
        code: JobCode,
        job_tasks: JobTasks,
        policy: JobPolicy,
        metrics: FLMetrics,
    ) -> None:
        self.fl = fl
        self.blobs = blobs
        self.state = state
        self.progress = progress
        self.code = code
        self.job_tasks = job_tasks
        self.policy = policy
        self.metrics = metrics

    @property
    def job_id(self) -> str:
        return self.state.job_id

    @property
    def job(self) -> FLJob:
        return self.state.job

    async def close(self, rnd: RoundRecord) -> bool:
        """Aggregate the round and record it; False if too few updates were usable."""
        state = self.state
        assert state.global_weights is not None
        updates = await asyncio.to_thread(self.fl.updates_for, self.job_id, rnd.round)
        counted = sorted((u for u in updates if u.complete), key=lambda u: u.device_id)
        late = await asyncio.to_thread(self.late_updates, rnd.round)
        clients: list[ClientUpdate] = []
        unreadable: dict[str, str] = {}
        entries = [(u.device_id, u, 1.0) for u in counted]
        entries += [(f"{u.device_id}@{r}", u, self.job.late.weight(rnd.round - r)) for r, u in late]
        reported = {
            u.device_id: rnd.reported_sizes[u.device_id]
            for u in counted
            if u.device_id in rnd.reported_sizes
        }
        if late:  # a late update is bounded by what its device reported before its own round
            sizes = {
                r.round: r.reported_sizes
                for r in await asyncio.to_thread(self.fl.list_rounds, self.job_id)
            }
            for r, u in late:
                if u.device_id in sizes.get(r, {}):
                    reported[f"{u.device_id}@{r}"] = sizes[r][u.device_id]
        for name, u, weight in entries:
            try:
                data = await asyncio.to_thread(self.blobs.read_blob, u.digest)
                _meta, delta = await asyncio.to_thread(
                    decode_weights, data, max_bytes=MAX_DECODE_BYTES
                )
            except (DecodeError, NotFoundError, OSError) as exc:
                unreadable[name] = f"unreadable: {exc}"
                continue
            assert u.examples is not None
            clients.append(
                ClientUpdate(
                    device_id=name,
                    delta=delta,
                    num_examples=u.examples,
                    metrics=u.metrics or {},
                    weight=weight,
                )
            )
        screened = self._screen(rnd.round, clients, unreadable, reported)
        clients = screened.kept
        # The round's figures show each clamp: what was claimed, what was used, and why.
        clamped = {
            name: {"claimed": claimed, "used": used, "reason": screened.reasons[name]}
            for name, (claimed, used) in screened.clamped.items()
        }
        before = state.strategy.state()
        try:
            result = await asyncio.to_thread(
                state.strategy.aggregate, state.global_weights, clients
            )
        except AggregationError as exc:
            log.warning("fl job %s round %d: %s", self.job_id, rnd.round, exc)
            return False
        try:
            return await self._commit(rnd, result, counted, unreadable, late, clamped=clamped)
        except BaseException:
            state.strategy.load_state(before)  # not committed: the round is aggregated again
            raise

    def _screen(
        self,
        round_no: int,
        clients: list[ClientUpdate],
        refused: dict[str, str],
        reported: Mapping[str, int],
    ) -> Screened:
        """What screening keeps and clamps (:mod:`.screening`); refusals are added to
        ``refused``, and every refusal and clamped count is logged and counted (by reason).
        ``reported``: update name -> the data size its device reported before its round."""
        job = self.job
        cap = job.max_examples_per_update or self.policy.max_examples_per_update
        if job.max_examples is not None:
            cap = min(cap, job.max_examples)
        screened = screen(
            clients,
            max_examples=cap,
            examples_ratio=job.examples_ratio,
            # The norm screen guards rules that weight updates by their size; a rule that
            # bounds each update's influence itself needs no refusals, which would only cost
            # it honest updates its minimum may need (a big device's honest update can be
            # several times the median).
            norm_ratio=None if self.state.strategy.bounds_influence() else job.norm_ratio,
            reported=reported,
        )
        metrics = self.metrics.screened
        for name, why in screened.refused.items():
            refused[name] = f"screened: {why}"
            metrics.labels("norm_outlier").inc()
            log.warning(
                "fl job %s round %d: update of %s refused: %s", self.job_id, round_no, name, why
            )
        for name, (claimed, used) in screened.clamped.items():
            reason = screened.reasons[name]
            metrics.labels(reason).inc()
            log.warning(
                "fl job %s round %d: %s claimed %d examples (reported data size %s); "
                "weighted as %d (%s)",
                self.job_id,
                round_no,
                name,
                claimed,
                reported.get(name, "unknown"),
                used,
                reason,
            )
        return screened

    def late_updates(self, round_no: int) -> list[tuple[int, UpdateRecord]]:
        """(round, update) of the late updates this round folds in (worker thread)."""
        late = self.job.late
        if late.policy != "fold":
            return []
        rounds = self.fl.list_rounds(self.job_id)
        closed_at = {r.round: r.closed_at for r in rounds}
        # One round past the window: updates uploaded inside it whose result came in after
        # the window's last round closed (the device reports after its upload).
        earlier = [
            r
            for r in rounds
            if r.state == "closed" and 0 < round_no - r.round <= late.max_rounds + 1
        ]
        done: set[str] = set()  # device@round of the updates some round already aggregated
        for r in earlier:
            metrics = r.metrics or {}
            aggregated = metrics.get("aggregated")
            if aggregated is None:  # a round closed before rounds recorded this
                aggregated = [*(r.contributors or []), *(metrics.get("rejected_updates") or {})]
            done.update(a if "@" in a else f"{a}@{r.round}" for a in aggregated)
        out: list[tuple[int, UpdateRecord]] = []
        for r in earlier:
            edge = closed_at.get(r.round + late.max_rounds)
            for u in self.fl.updates_for(self.job_id, r.round):
                if f"{u.device_id}@{r.round}" in done:
                    continue
                if not late.takes(round_no - r.round) and (edge is None or u.accepted_at > edge):
                    continue  # uploaded after the window's last round closed
                task_id = r.tasks.get(u.device_id)
                if not u.complete and (
                    task_id is None or not self.progress.link(r.round, u.device_id, task_id, u)
                ):
                    continue  # its result is not in yet: a later round may fold it
                out.append((r.round, u))
        if any(not u.complete for _, u in out):  # linked just now: read them again
            fresh = {
                (r, u.device_id): u
                for r in {r for r, _ in out}
                for u in self.fl.updates_for(self.job_id, r)
            }
            out = [(r, fresh[(r, u.device_id)]) for r, u in out]
        return out

    async def _commit(
        self,
        rnd: RoundRecord,
        result: Any,
        counted: Sequence[Any],
        unreadable: dict[str, str],
        late: Sequence[tuple[int, UpdateRecord]] = (),
        *,
        clamped: Mapping[str, Any] | None = None,
    ) -> bool:
        job = self.job
        state = self.state
        blob = encode_weights(result.weights, kind="weights", round=rnd.round, job=self.job_id)
        digest = await asyncio.to_thread(self.blobs.put_bytes, blob)
        state_ref: dict[str, Any] = {}
        if result.state:
            state_blob = encode_weights(dict(result.state), kind="weights", round=rnd.round)
            state_ref["digest"] = await asyncio.to_thread(self.blobs.put_bytes, state_blob)
        now = time.time()
        metrics: dict[str, Any] = {
            "selected": len(rnd.selected),
            "accepted": len(counted),
            "contributors": len(result.contributors),
            "rejected_updates": {**result.rejected, **unreadable},
            "clamped_examples": dict(clamped or {}),
            "upload_rejects": dict(rnd.rejects),
            "rejected": sum(rnd.rejects.values()) + len(result.rejected) + len(unreadable),
            "examples": result.num_examples,
            "bytes_up": sum(u.size for u in counted) + sum(u.size for _, u in late),
            "bytes_down": state.global_size * len(rnd.selected),
            "wall_s": now - rnd.started_at,
            "attempts": rnd.attempt,
            "expected_round_s": (rnd.selection or {}).get("expected_round_s"),
            **{k: float(v) for k, v in result.metrics.items() if math.isfinite(v)},
            # Every update this round gave the strategy: its own (device ids) and late ones
            # (device@round), so that no later round folds them again.
            "aggregated": [u.device_id for u in counted] + [f"{u.device_id}@{r}" for r, u in late],
        }
        if self.job.late.policy == "fold":
            metrics["late"] = len(late)
            metrics["late_used"] = sum("@" in c for c in result.contributors)
        if "client.loss_after" in result.metrics:
            metrics["loss"] = result.metrics["client.loss_after"]
        if state.eval_set is not None:
            loss, accuracy = await self.code.run(
                "evaluate",
                modelio.evaluate,
                job.model,
                self.policy,
                result.weights,
                state.eval_set,
            )
            metrics["loss"], metrics["accuracy"] = loss, accuracy
        if isinstance(state.strategy, CentralDP) and job.dp is not None:
            eligible = max(1, int((rnd.selection or {}).get("eligible") or len(rnd.selected)))
            metrics["dp.epsilon"] = float(
                state.strategy.epsilon(
                    delta=job.dp.delta, sampling_rate=min(1.0, job.clients_per_round / eligible)
                )
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
            lease=state.lease,
        )
        if not closed:
            return True  # closed already (an earlier term): the main loop reloads
        if self.job.late.policy != "fold":
            # Nothing will take a straggler's update now: stop its training.
            await self.job_tasks.cancel([rnd], "round_closed")
        state.global_weights, state.global_size = dict(result.weights), len(blob)
        self.metrics.rounds.labels("closed").inc()
        self.metrics.round_seconds.observe(metrics["wall_s"])
        log.info(
            "fl job %s round %d closed: %d updates (%d selected)%s, %.1fs%s",
            self.job_id,
            rnd.round,
            len(counted),
            len(rnd.selected),
            f" + {len(late)} late" if late else "",
            metrics["wall_s"],
            f", accuracy {metrics['accuracy']:.4f}" if "accuracy" in metrics else "",
        )
        return True


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
