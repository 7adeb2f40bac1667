"""Closing a round: aggregate the updates that count, write the new weights and the
strategy's state, score them centrally, and record it all in one transaction."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from coordinator.errors import NotFoundError
from coordinator.federated import modelio
from coordinator.federated.jobstate import MAX_DECODE_BYTES, JobState
from coordinator.federated.store import (
    RoundRecord,
)
from coordinator.federated.strategies import AggregationError, ClientUpdate
from coordinator.federated.strategies.dp import CentralDP
from protocol.errors import DecodeError
from protocol.weights import decode_weights, encode_weights

log = logging.getLogger(__name__)


class RoundClosing(JobState):
    """Aggregation and the round's figures."""

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
            **{k: float(v) for k, v in result.metrics.items() if math.isfinite(v)},
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
            metrics["dp.epsilon"] = float(
                self.strategy.epsilon(
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
