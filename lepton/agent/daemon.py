"""The agent daemon: ties link, runner, outbox, capacity reporting and systemd together.

``async with Agent(config) as agent: await agent.run()`` runs one TaskGroup of named tasks
(link, workers, capacity, watchdog, housekeeping) until :meth:`Agent.stop` is called (SIGTERM).
Shutdown drains running tasks, hands finished results to the broker, publishes the retained
offline state and disconnects cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from concurrent.futures import Executor
from typing import Any

import msgspec

from lepton.agent import __version__
from lepton.agent.config import AgentConfig
from lepton.agent.credentials import CoordinatorCredentials, warn_if_not_enrolled
from lepton.agent.handlers import HandlerRegistry, TaskContext, TaskServices, default_registry
from lepton.agent.inference.eviction import Caps
from lepton.agent.inference.manager import ModelManager
from lepton.agent.link import Link
from lepton.agent.metrics import Counters
from lepton.agent.outbox import Outbox
from lepton.agent.runner import Runner
from lepton.agent.sdnotify import Notifier
from lepton.agent.telemetry.capacity import CapacitySampler, Sampler
from lepton.agent.telemetry.changes import significant_change
from lepton.agent.telemetry.probe import ProbeResult, load_probe
from lepton.agent.training.datasources import DataSources
from lepton.agent.training.tasks import weights_cache
from lepton.agent.update.health import EXIT_RESTART, EXIT_UNHEALTHY, HealthChecks, UnhealthyError
from lepton.agent.update.updater import Updater
from lepton.common.tls import client_context
from lepton.protocol import topics
from lepton.protocol.aio import cancel_and_wait
from lepton.protocol.codec import decode, encode
from lepton.protocol.errors import DecodeError
from lepton.protocol.imports import Allowlist
from lepton.protocol.messages import (
    CapacityReport,
    ResultAck,
    State,
    TaskAck,
    TaskCancel,
    UpdateStatus,
)

log = logging.getLogger(__name__)

# Sample the device this often between reports, to catch thermal, battery and memory changes.
SAMPLE_PERIOD_S = 5.0


class Agent:
    """One device agent."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        registry: HandlerRegistry | None = None,
        sampler: Sampler | None = None,
        outbox_executor: Executor | None = None,
    ) -> None:
        self.config = config
        self.counters = Counters()
        self.started_at = time.time()
        self.outbox = Outbox(
            config.agent.state_dir / "agent.db",
            max_entries=config.outbox.max_entries,
            sync=config.outbox.sync,
            executor=outbox_executor,
        )
        self.notifier = Notifier()
        self.probe: ProbeResult | None = None
        self.credentials = CoordinatorCredentials(
            config.fetch.coordinator_url, config.fetch.http_token
        )
        warn_if_not_enrolled(self.credentials)
        self.models = ModelManager(
            config.agent.state_dir / "models",
            threads=config.inference.threads,
            providers=config.inference.providers,
            allow_spinning=config.inference.allow_spinning,
            max_bytes=config.inference.max_model_bytes,
            retries=config.inference.download_retries,
            timeout=config.inference.download_timeout_s,
            origins=config.origins,
            # One verified-HTTPS context for every download and upload (None: system CAs).
            tls=(
                client_context(config.fetch.ca_file, what="fetch.ca_file")
                if config.fetch.ca_file is not None
                else None
            ),
            # The device's token, for the coordinator's origin only.
            credentials=self.credentials,
            caps=Caps(
                max_models=config.inference.max_models,
                max_loaded_bytes=config.inference.max_loaded_bytes,
                max_cache_bytes=config.inference.max_cache_bytes,
            ),
        )
        self.data_sources = DataSources(config.data)
        #: The process's exit status once run() returns (non-zero: a supervisor restarts it).
        self.exit_code = 0
        self.updater = (
            Updater(
                config.update,
                config.agent.state_dir,
                device_class=config.device.class_,
                on_restart=self._restart_for_update,
            )
            if config.update.active
            else None
        )
        self._first_connect = asyncio.Event()
        self._first_report = asyncio.Event()
        self.services = TaskServices(
            models=self.models,
            data_sources=self.data_sources,
            weights_store=weights_cache(config.agent.state_dir, self.models),
            # Only what this device's own config allows, never what a task names.
            model_imports=Allowlist(config.agent.model_imports).with_plugins(),
            updater=self.updater,
        )
        self.endpoint_port: int | None = None  # the bound TCP port once the endpoint listens
        self._registry = registry or default_registry()
        self._stop = asyncio.Event()
        self._report_now = asyncio.Event()
        self._last_report: CapacityReport | None = None
        self._last_report_at = 0.0
        self._heartbeat = time.monotonic()
        self._ready_sent = False
        self._background: set[asyncio.Future[bool]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None  # set by run()
        self.link = Link(
            config,
            outbox=self.outbox,
            counters=self.counters,
            birth=self._birth,
            on_message=self._on_message,
            on_connect=self._on_connect,
        )
        self.runner = Runner(
            slots=config.agent.slots,
            queue_limit=config.agent.queue_limit,
            registry=self._registry,
            outbox=self.outbox,
            context=TaskContext(
                device_id=config.device.id,
                state_dir=config.agent.state_dir,
                agent_version=__version__,
                services=self.services,
            ),
            result_topic=self.link.result_topic,
            counters=self.counters,
            crash_limit=config.agent.crash_limit,
            on_result=self.link.wake,
            on_change=self._report_now.set,
        )
        self.sampler: Sampler = sampler or CapacitySampler(
            state_dir=config.agent.state_dir,
            probe=None,
            device_class=config.device.class_,
            tags=config.device.tags,
        )
        if self.updater is not None and not self.updater.device_class:
            # The class the device reports (board detection when the config sets none) is
            # the one its releases must name.
            self.updater.device_class = self.sampler.device_class

    async def __aenter__(self) -> Agent:
        self.config.agent.state_dir.mkdir(parents=True, exist_ok=True)
        await self.outbox.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.models.close()
        await self.outbox.close()

    def stop(self, exit_code: int | None = None) -> None:
        """Begin a graceful shutdown (idempotent; safe from a signal handler)."""
        if exit_code is not None:
            self.exit_code = exit_code
        self._stop.set()

    def _restart_for_update(self) -> None:
        # From the installer's thread: stop with a failure status so the supervisor starts
        # the new image (through `lepton-slot boot`).
        log.info("a new agent image is on trial: restarting")
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.stop, EXIT_RESTART)

    # ------------------------------------------------------------ main

    async def run(self, *, install_signal_handlers: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        if install_signal_handlers:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
        self.notifier.status("starting")
        await self.runner.resume()
        async with asyncio.TaskGroup() as tg:
            loops = [
                tg.create_task(self.link.run(), name="link"),
                tg.create_task(self._capacity_loop(), name="capacity"),
                tg.create_task(self._housekeeping(), name="housekeeping"),
                tg.create_task(self._watchdog(), name="watchdog"),
                tg.create_task(self.models.restore(), name="models"),
            ]
            if self.config.endpoint.enabled:
                loops.append(tg.create_task(self._endpoint(), name="endpoint"))
            workers = [
                tg.create_task(self.runner.worker(), name=f"worker-{i}")
                for i in range(self.config.agent.slots)
            ]
            if self.config.agent.probe:
                loops.append(tg.create_task(self._load_probe(), name="probe"))
            if self.updater is not None:
                self.updater.add_listener(self._update_changed)
                loops.append(tg.create_task(self.updater.watch(), name="update-watch"))
                loops.append(tg.create_task(self._trial_gate(), name="trial-gate"))
            try:
                await self._stop.wait()
                await self._shutdown()
            finally:
                # Also when this task is cancelled: the TaskGroup would cancel its children
                # only once, and a cancel one of them loses would leave it waiting for good.
                await cancel_and_wait(loops + workers)
        log.info("agent stopped")

    async def _shutdown(self) -> None:
        self.notifier.stopping()
        log.info(
            "shutting down: draining running tasks (up to %.0f s)",
            self.config.agent.drain_timeout_s,
        )
        if not await self.runner.drain(self.config.agent.drain_timeout_s):
            log.warning("drain timed out with %d tasks still running", self.runner.busy)
        if self.link.connected.is_set():
            if not await self.link.flush(timeout=5.0):
                log.warning(
                    "%d results not yet handed to the broker; kept for next start", len(self.outbox)
                )
            await self.link.say_goodbye()

    # ------------------------------------------------------------ messages

    def _birth(self) -> State:
        probe = self.probe
        update: UpdateStatus | None = None
        if self.updater is not None:
            try:
                update = self.updater.status()
            except (OSError, ValueError):  # an unreadable boot.json: report none
                log.exception("update status unreadable")
        return State(
            state="online",
            agent_version=__version__,
            device_class=self.sampler.device_class,
            runtimes=list(probe.runtimes) if probe else [],
            started_at=self.started_at,
            update=update,
        )

    # ------------------------------------------------------------ updates

    def _update_changed(self, status: UpdateStatus) -> None:
        # Any thread (the installer's watcher): republish the retained birth message.
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._republish_birth)

    def _republish_birth(self) -> None:
        if not self.link.connected.is_set():
            return  # the next connection publishes the birth message anyway
        task = asyncio.ensure_future(
            self.link.publish(self.link.state_topic, encode(self._birth()), qos=1, retain=True)
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _trial_gate(self) -> None:
        assert self.updater is not None
        checks = HealthChecks(
            connected=self._first_connect,
            first_report=self._first_report,
            providers=self.config.inference.providers,
        )
        try:
            await self.updater.trial(checks)
        except UnhealthyError as exc:
            log.error("agent image on trial is not healthy (%s): exiting", exc.reason)  # noqa: TRY400
            self.stop(EXIT_UNHEALTHY)

    def _on_connect(self) -> None:
        self._first_connect.set()
        self._report_now.set()
        if not self._ready_sent:
            self._ready_sent = True
            self.notifier.ready()
        self.notifier.status(f"connected to {self.config.broker.host}:{self.config.broker.port}")

    async def _on_message(self, topic: str, channel: str, payload: bytes) -> None:
        if channel == topics.TASK:
            await self._on_task(topic, payload)
        elif channel == topics.RESULT_ACK:
            try:
                ack = decode(payload, ResultAck)
            except DecodeError as exc:
                self.counters.reject(log, exc.reason, exc.detail, topic=topic)
                return
            removed = await self.outbox.ack(ack.ids)
            self.counters.inc("results.acked", removed)
            if removed < len(ack.ids):
                self.counters.inc("results.ack_unknown", len(ack.ids) - removed)
        elif channel == topics.CANCEL:
            try:
                cancel = decode(payload, TaskCancel)
            except DecodeError as exc:
                self.counters.reject(log, exc.reason, exc.detail, topic=topic)
                return
            await self.runner.cancel(cancel.task_ids, cancel.reason)
        else:
            self.counters.reject(log, "unknown_channel", channel, topic=topic)

    async def _on_task(self, topic: str, payload: bytes) -> None:
        try:
            task, reason = await self.runner.submit(payload)
        except DecodeError as exc:
            self.counters.reject(log, exc.reason, exc.detail, topic=topic)
            return
        if reason is not None and reason != "duplicate":
            self.counters.reject(log, reason, f"task {task.task_id} ({task.kind})", topic=topic)
        ack = TaskAck(task_id=task.task_id, accepted=reason is None, reason=reason)
        await self.link.publish(self.link.task_ack_topic, encode(ack), qos=1)

    # ------------------------------------------------------------ capacity

    async def _load_probe(self) -> None:
        try:
            self.probe = await load_probe(self.config.agent.state_dir, agent_version=__version__)
        except Exception:  # the agent runs without figures rather than not at all
            log.exception("device probe failed")
            return
        self.sampler.probe = self.probe
        self._report_now.set()

    def _sample(self) -> CapacityReport:
        report = self.sampler.sample(
            slots=self.runner.slots_report(),
            outbox_pending=len(self.outbox),
            counters=self.counters.snapshot(),
            interval_s=self.config.agent.capacity_interval_s,
        )
        if self.config.data:
            names = sorted(self.config.data)
            # Sizes are known once a task loaded the source: the agent never reads its data
            # just to report on it (numpy stays unloaded until a task needs it).
            known = self.data_sources.sizes()
            report = msgspec.structs.replace(
                report,
                data_sources=names,
                data_sizes={n: known[n] for n in names if n in known},
            )
        return report

    async def _capacity_loop(self) -> None:
        interval = self.config.agent.capacity_interval_s
        min_gap = self.config.agent.capacity_min_interval_s
        while True:
            self._heartbeat = time.monotonic()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(interval, SAMPLE_PERIOD_S)):
                    await self._report_now.wait()
            forced = self._report_now.is_set()
            self._report_now.clear()
            if not self.link.connected.is_set():
                continue
            now = time.monotonic()
            since = now - self._last_report_at
            if since < min_gap:
                # Rate limit: report at most every min_gap seconds, but do not lose the change.
                await asyncio.sleep(min_gap - since)
            report = self._sample()
            due = self._last_report is None or time.monotonic() - self._last_report_at >= interval
            reason = (
                None if self._last_report is None else significant_change(self._last_report, report)
            )
            if not (due or reason or forced):
                continue
            if await self.link.publish(self.link.capacity_topic, encode(report), qos=0):
                self._last_report = report
                self._last_report_at = time.monotonic()
                self.counters.inc("capacity.reports")
                self._first_report.set()

    # ------------------------------------------------------------ local endpoint

    async def _endpoint(self) -> None:
        from lepton.agent.inference.endpoint import Endpoint

        # A token file that went bad since the config was loaded raises ConfigError here,
        # which stops the agent: it never serves with a weaker guard than configured.
        endpoint = Endpoint.from_config(self.models, self.config.endpoint, counters=self.counters)
        try:
            async with endpoint:
                self.endpoint_port = endpoint.port
                await asyncio.Event().wait()  # until shutdown cancels this task
        except OSError as exc:  # the agent's fleet work goes on without the local API
            log.error("inference endpoint not started: %s", exc)  # noqa: TRY400

    # ------------------------------------------------------------ housekeeping

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(600)
            pruned = await self.outbox.prune_done()
            if pruned:
                log.debug("pruned %d expired task ids", pruned)

    async def _watchdog(self) -> None:
        interval = self.notifier.watchdog_interval()
        if interval is None:
            return
        period = max(interval / 2, 0.5)
        while True:
            # Ping only while the main loop is alive: the capacity loop beats every few seconds.
            if time.monotonic() - self._heartbeat < 3 * SAMPLE_PERIOD_S + period:
                self.notifier.watchdog()
            else:
                log.error("capacity loop stalled; withholding the watchdog ping")
            await asyncio.sleep(period)


def describe(agent: Agent) -> dict[str, Any]:
    """A JSON-friendly status of the agent (for `lepton-agent status` and tests)."""
    return {
        "device_id": agent.config.device.id,
        "connected": agent.link.connected.is_set(),
        "outbox": len(agent.outbox),
        "busy": agent.runner.busy,
        "queued": agent.runner.queued,
        "counters": agent.counters.snapshot(),
    }
