"""Opening a round: choose its devices, record it, submit their train tasks; and extending
a round that fell short of its minimum by its deadline."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Final

import numpy as np

from lepton.coordinator.errors import ConflictError, NotFoundError
from lepton.coordinator.fl.credentials import SCHEME
from lepton.coordinator.fl.jobs import planning
from lepton.coordinator.fl.jobs.progress import JobFailedError, JobState
from lepton.coordinator.fl.records import JobRecord, RoundRecord
from lepton.coordinator.tasks.states import IN_FLIGHT
from lepton.coordinator.tasks.submit import build_task
from lepton.protocol import routes
from lepton.protocol.tasks import WeightsRef

log = logging.getLogger(__name__)

NO_DEVICES_RECHECK_S: Final = 2.0


class RoundOpening(JobState):
    """Selection and task submission of a job's rounds."""

    async def _open(self, record: JobRecord) -> RoundRecord | None:
        round_no = record.round
        chosen = await self._select(record, want=self.job.clients_per_round, exclude=frozenset())
        if chosen is None:
            return None
        devices, info, sizes = chosen
        now = time.time()
        tokens = dict.fromkeys(devices, SCHEME)  # no secret: credentials are derived
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
            reported_sizes=sizes,
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
    ) -> tuple[list[str], dict[str, Any], dict[str, int]] | None:
        """Devices for the round, how they were chosen, and the size each reported for the
        job's data source (None while too few are eligible, re-checked on a timer)."""
        job = self.job
        shape = planning.RoundShape(
            weights_bytes=self.global_size,
            update_bytes=planning.expected_update_bytes(self.global_size, job.compression),
            flops_per_example=record.flops_per_example or 1.0,
        )

        def gather() -> tuple[list[Any], dict[str, str], int, dict[str, int]]:
            rows = self.store.list_devices(state="online", limit=1_000_000)
            # Read with the selection, before the round: what a device reports once it has
            # its task cannot raise the bound on its own update.
            sizes = planning.reported_sizes(rows, job.data)
            states = planning.device_states(rows, self.store.inflight_by_device())
            rounds = [r for r in self.fl.list_rounds(self.job_id) if r.round < record.round]
            backlog = planning.backlog_s(self._working(rounds), time.time())
            history = planning.participation(
                [(r.round, r.selected) for r in rounds], record.round, working=backlog
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
                backlog=backlog,
            )
            return cands, why, len(states), sizes

        cands, why, online, sizes = await asyncio.to_thread(gather)
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
        late = planning.past_the_job(job, cands, want, record.round)
        if late:
            cands = [c for c in cands if c.device_id not in late]
            why = {**why, **dict.fromkeys(late, "past_the_job")}
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
        return picked.devices, info, {d: sizes[d] for d in picked.devices if d in sizes}

    def _working(self, rounds: list[RoundRecord]) -> dict[str, list[tuple[float, float | None]]]:
        """device -> (round start, expected seconds) of each train task of an earlier round
        of this job it still holds, assigned or running (worker thread)."""
        ours = {
            tid: (device, r.started_at, ((r.selection or {}).get("expected_s") or {}).get(device))
            for r in rounds
            for device, tid in r.tasks.items()
        }
        out: dict[str, list[tuple[float, float | None]]] = {}
        if not ours:
            return out
        for state in IN_FLIGHT:
            for t in self.store.list_tasks(state=state, kind=planning.KIND, limit=1_000_000):
                if t.id in ours:
                    device, started, expected = ours[t.id]
                    out.setdefault(device, []).append((started, expected))
        return out

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
                weights=WeightsRef(
                    digest=digest,
                    size=self.global_size,
                    url=base + routes.path(routes.BLOB, digest=digest),
                ),
                upload_url=base
                + routes.path(
                    routes.FL_UPLOAD, job_id=self.job_id, round_no=rnd.round, device_id=device
                ),
                strategy_knobs=knobs,
            )
            request = planning.train_request(
                self.job,
                planning.RoundShape(
                    weights_bytes=self.global_size,
                    update_bytes=0,
                    flops_per_example=flops,
                ),
                examples.get(device, self.job.examples_hint),
                params,
                task_id=tid,
                device_id=device,
                expires_in_s=rnd.deadline - now,
            )
            task = build_task(self.engine.cfg, request, now=now)
            try:
                await asyncio.to_thread(self.store.submit, task)
                submitted += 1
            except ConflictError:
                pass
        if submitted:
            self.engine.on_submit()

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
            await self._cancel_tasks([rnd], "round_failed")
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
        sizes = chosen[2] if chosen else {}
        tokens = dict.fromkeys(devices, SCHEME)
        tasks = {d: planning.task_id(self.job_id, rnd.round, d) for d in devices}
        extended = await asyncio.to_thread(
            self.fl.extend_round,
            self.job_id,
            rnd.round,
            selected=devices,
            tokens=tokens,
            tasks=tasks,
            deadline=time.time() + job.deadline_s,
            reported_sizes=sizes,
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
