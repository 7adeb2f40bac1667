"""Opening a round: choose its devices, record it, submit their train tasks; and extending
a round that fell short of its minimum by its deadline."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Final

import numpy as np

from lepton.coordinator.config import Config
from lepton.coordinator.errors import ConflictError, NotFoundError
from lepton.coordinator.fl.credentials import SCHEME
from lepton.coordinator.fl.jobs import planning
from lepton.coordinator.fl.jobs.progress import JobFailedError, JobState, JobTasks, RoundProgress
from lepton.coordinator.fl.metrics import FLMetrics
from lepton.coordinator.fl.records import JobRecord, RoundRecord
from lepton.coordinator.fl.store import FLStore
from lepton.coordinator.scheduler import CostModel
from lepton.coordinator.store.devices import DeviceRepo
from lepton.coordinator.store.tasks import TaskRepo
from lepton.coordinator.tasks.states import IN_FLIGHT
from lepton.coordinator.tasks.submit import build_task
from lepton.protocol import routes
from lepton.protocol.tasks import WeightsRef

log = logging.getLogger(__name__)

NO_DEVICES_RECHECK_S: Final = 2.0


class RoundOpener:
    """Selection and task submission of one job's rounds.

    ``planner`` gives the cost model of the moment (the scheduler's estimator learns);
    ``urls`` the base URL devices download weights from and upload updates to.
    """

    def __init__(
        self,
        fl: FLStore,
        devices: DeviceRepo,
        tasks: TaskRepo,
        planner: Callable[[], CostModel],
        urls: Callable[[], str],
        *,
        cfg: Config,
        metrics: FLMetrics,
        state: JobState,
        progress: RoundProgress,
        job_tasks: JobTasks,
        on_submit: Callable[[], None],
    ) -> None:
        self.fl = fl
        self.devices = devices
        self.tasks = tasks
        self.planner = planner
        self.urls = urls
        self.cfg = cfg
        self.metrics = metrics
        self.state = state
        self.progress = progress
        self.job_tasks = job_tasks
        self.on_submit = on_submit

    @property
    def job_id(self) -> str:
        return self.state.job_id

    async def open(self, record: JobRecord) -> RoundRecord | None:
        round_no = record.round
        job = self.state.job
        chosen = await self._select(record, want=job.clients_per_round, exclude=frozenset())
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
            deadline=now + job.deadline_s,
            reported_sizes=sizes,
            lease=self.state.lease,
        )
        log.info(
            "fl job %s round %d: %d devices selected (%s), deadline %.0fs",
            self.job_id,
            round_no,
            len(devices),
            job.selection,
            job.deadline_s,
        )
        await self.ensure_tasks(rnd)
        return rnd

    async def _select(
        self, record: JobRecord, *, want: int, exclude: frozenset[str], attempt: int = 1
    ) -> tuple[list[str], dict[str, Any], dict[str, int]] | None:
        """Devices for the round, how they were chosen, and the size each reported for the
        job's data source (None while too few are eligible, re-checked on a timer)."""
        job = self.state.job
        size = self.state.global_size
        shape = planning.RoundShape(
            weights_bytes=size,
            update_bytes=planning.expected_update_bytes(size, job.compression),
            flops_per_example=record.flops_per_example or 1.0,
        )

        def gather() -> tuple[list[Any], dict[str, str], int, dict[str, int]]:
            rows = self.devices.list_devices(state="online", limit=1_000_000)
            # Read with the selection, before the round: what a device reports once it has
            # its task cannot raise the bound on its own update.
            sizes = planning.reported_sizes(rows, job.data)
            states = planning.device_states(rows, self.tasks.inflight_by_device())
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
                self.planner(),
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
            await self.state.sleep(NO_DEVICES_RECHECK_S)
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
            for t in self.tasks.list_tasks(state=state, kind=planning.KIND, limit=1_000_000):
                if t.id in ours:
                    device, started, expected = ours[t.id]
                    out.setdefault(device, []).append((started, expected))
        return out

    async def ensure_tasks(self, rnd: RoundRecord) -> None:
        """Submit the round's train tasks not submitted yet (idempotent by task id)."""
        state = self.state
        job = state.job
        base = self.urls().rstrip("/")
        digest = rnd.base_digest
        knobs = state.strategy.configure_fit(rnd.round)
        examples = await asyncio.to_thread(self.fl.examples_by_device, self.job_id)
        flops = state.record.flops_per_example or 1.0
        submitted = 0
        for device, tid in rnd.tasks.items():
            try:
                await asyncio.to_thread(self.tasks.get_task, tid)
                continue
            except NotFoundError:
                pass
            now = time.time()
            if rnd.deadline <= now:
                continue
            params = planning.train_params(
                job,
                self.job_id,
                rnd.round,
                device,
                weights=WeightsRef(
                    digest=digest,
                    size=state.global_size,
                    url=base + routes.path(routes.BLOB, digest=digest),
                ),
                upload_url=base
                + routes.path(
                    routes.FL_UPLOAD, job_id=self.job_id, round_no=rnd.round, device_id=device
                ),
                strategy_knobs=knobs,
            )
            request = planning.train_request(
                job,
                planning.RoundShape(
                    weights_bytes=state.global_size,
                    update_bytes=0,
                    flops_per_example=flops,
                ),
                examples.get(device, job.examples_hint),
                params,
                task_id=tid,
                device_id=device,
                expires_in_s=rnd.deadline - now,
            )
            task = build_task(self.cfg, request, now=now)
            try:
                await asyncio.to_thread(self.tasks.submit, task)
                submitted += 1
            except ConflictError:
                pass
        if submitted:
            self.on_submit()

    async def extend(self, rnd: RoundRecord) -> RoundRecord | None:
        """Ask more devices and move the deadline; fail the job after too many attempts."""
        job = self.state.job
        lease = self.state.lease
        if rnd.attempt >= job.max_round_attempts:
            progress = await self.progress.read(rnd)
            await asyncio.to_thread(
                self.fl.close_round,
                self.job_id,
                rnd.round,
                state="failed",
                now=time.time(),
                metrics={"accepted": progress.complete, "needed": job.needed},
                lease=lease,
            )
            self.metrics.rounds.labels("failed").inc()
            await self.job_tasks.cancel([rnd], "round_failed")
            raise JobFailedError(
                f"round {rnd.round}: {progress.complete} of {job.needed} updates after "
                f"{rnd.attempt} attempts"
            )
        progress = await self.progress.read(rnd)
        want = max(1, job.clients_per_round - progress.complete)
        chosen = await self._select(
            self.state.record, want=want, exclude=frozenset(rnd.tokens), attempt=rnd.attempt + 1
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
            lease=lease,
        )
        self.metrics.rounds.labels("extended").inc()
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
        await self.ensure_tasks(extended)
        return extended
