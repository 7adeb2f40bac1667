"""The coordinator service: an ``async with`` daemon running one task group.

Named tasks: ``registry`` (batched capacity writes), ``ingest`` (births, wills, task acks and
results), ``lease`` (leader election), the features' leader-only loops (``scheduler`` and
``liveness`` of tasks, ``fl`` of federated jobs) and ``http`` (API and metrics). The MQTT
network thread feeds ``registry`` and ``ingest``.

Features (tasks, the model registry, federated jobs) plug in through
:class:`~lepton.coordinator.feature.Feature`: they are built whether or not HTTP is enabled,
their tables are created in one place (:meth:`Coordinator._create_tables`), and ``_run`` and
``_drain`` loop over them.

:meth:`Coordinator.stop` (SIGTERM, SIGINT) drains in order: stop HTTP and the leader loops,
drain the features, give the lease up, stop taking device messages, apply what was already
received, write the last capacity batch, then disconnect. Anything not applied by then is
re-sent by the agents, which keep every unacknowledged result.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Final, TypeVar

from fastapi import FastAPI

from lepton.coordinator.api import ApiContext, create_app
from lepton.coordinator.api.app import create_metrics_app
from lepton.coordinator.api.server import HttpServer
from lepton.coordinator.auth.broker_accounts import make_broker_accounts
from lepton.coordinator.auth.enrolment_feature import EnrolmentFeature
from lepton.coordinator.auth.feature import AuthFeature
from lepton.coordinator.auth.revoked import RevokedDevices
from lepton.coordinator.config import Config
from lepton.coordinator.feature import Feature
from lepton.coordinator.metrics import Metrics
from lepton.coordinator.runtime.capacity_writer import OnFlush, Registry
from lepton.coordinator.runtime.control import Control
from lepton.coordinator.runtime.dispatcher import Scheduler
from lepton.coordinator.runtime.ingest import Inbox, Ingest, subscriptions
from lepton.coordinator.runtime.leadership import Leadership
from lepton.coordinator.runtime.liveness import Liveness
from lepton.coordinator.runtime.mqtt import MqttLink
from lepton.coordinator.runtime.routes import make_router as make_devices_router
from lepton.coordinator.store import ResultOutcome, RetryPolicy, StateUpdate, Store
from lepton.coordinator.tasks.feature import TasksFeature
from lepton.protocol.aio import cancel_and_wait

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S: Final = 10.0
F = TypeVar("F")


class Coordinator:
    """One coordinator process. ``async with Coordinator(cfg) as c: await c.wait()``."""

    def __init__(self, config: Config, *, on_flush: OnFlush | None = None) -> None:
        self.config = config
        self.metrics = Metrics()
        self.inbox = Inbox()
        self._on_flush = on_flush
        self._stop = asyncio.Event()
        self._stopped = asyncio.Event()
        self._main: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[None] | None = None
        self.started_at = time.time()
        self.http: HttpServer | None = None
        self.metrics_http: HttpServer | None = None  # /metrics apart (http.metrics_port)
        #: In build order (a feature may use an earlier one's objects); see :meth:`_features`.
        self.features: list[Feature] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Coordinator:
        cfg = self.config
        t = cfg.tasks
        self.store = await asyncio.to_thread(
            Store.open,
            cfg.database_url,
            retry=RetryPolicy(base_s=t.retry_backoff_s, max_s=t.retry_backoff_max_s),
            capacity_history=cfg.database.capacity_history,
            sqlite_synchronous=cfg.database.sqlite_synchronous,
            echo=cfg.database.echo,
            create=False,
        )
        try:
            self._build()
            await asyncio.to_thread(self._create_tables)
            self.metrics.watch_store(self.store.devices.count_devices, self.store.tasks.count_tasks)
            loop = self._loop = asyncio.get_running_loop()
            self.inbox.bind(loop)
            self.registry.bind(loop)
            for feature in self.features:
                feature.start(loop)
            if cfg.http.enabled:
                self.http = HttpServer(
                    self._app(),
                    cfg.http.host,
                    cfg.http.port,
                    limits=cfg.http,
                    on_head_timeout=self.metrics.http_rejects.labels("head_timeout").inc,
                )
            if cfg.http.metrics_port:
                self.metrics_http = HttpServer(
                    create_metrics_app(self.metrics),
                    cfg.http.metrics_host,
                    cfg.http.metrics_port,
                    limits=cfg.http,
                )
            self._ready = loop.create_future()
            self._main = asyncio.create_task(self._run(), name="coordinator")
            await asyncio.wait({self._ready, self._main}, return_when=asyncio.FIRST_COMPLETED)
            if self._main.done():
                self._main.result()  # start-up failed: raise why
        except BaseException:
            await asyncio.to_thread(self.store.close)
            raise
        log.info(
            "coordinator %s up: fleet %s, database %s, broker %s:%d, api %s",
            cfg.instance_id,
            cfg.fleet,
            self.store.dialect,
            cfg.mqtt.host,
            cfg.mqtt.port,
            self.http.url if self.http else "disabled",
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        if self._main is not None:
            try:
                await self._main
            finally:
                await asyncio.to_thread(self.store.close)

    def stop(self) -> None:
        """Begin a graceful shutdown (idempotent, event loop thread)."""
        self._stop.set()

    async def wait(self) -> None:
        """Until the service has stopped (after :meth:`stop`, or a task failed)."""
        assert self._main is not None
        await asyncio.shield(self._main)

    @property
    def api_url(self) -> str | None:
        return self.http.url if self.http is not None else None

    def feature(self, kind: type[F]) -> F:
        """The feature of class ``kind`` (``LookupError`` if this coordinator has none)."""
        for feature in self.features:
            if isinstance(feature, kind):
                return feature
        raise LookupError(f"no {kind.__name__} feature")

    # ------------------------------------------------------------------ wiring

    def _build(self) -> None:
        cfg = self.config
        store, metrics = self.store, self.metrics
        self.registry = Registry(
            store.devices, metrics, cfg.registry, fleet=cfg.fleet, on_flush=self._on_flush
        )
        self.revoked = RevokedDevices()
        self.ingest = Ingest(
            cfg.fleet,
            metrics,
            on_capacity=self.registry.offer,
            inbox=self.inbox,
            revoked=self.revoked,
        )
        shared = cfg.mqtt.shared_group if cfg.mqtt.shared_subscriptions else None
        self.link = MqttLink(
            cfg.mqtt,
            client_id=cfg.mqtt_client_id,
            subscriptions=subscriptions(cfg.fleet, shared_group=shared),
            on_message=self.ingest.handle,
            on_connection=self._link_changed,
        )
        self.accounts = make_broker_accounts(
            cfg.mqtt.accounts,
            self.link,
            cfg.fleet,
            timeout_s=cfg.mqtt.accounts_timeout_s,
            on_reject=metrics.reject,
        )
        self.leadership = Leadership(store.leases, cfg.instance_id, cfg.replica.lease_s, metrics)
        self.scheduler = Scheduler(
            cfg,
            self.link,
            metrics,
            devices=store.devices,
            tasks=store.tasks,
            cancels=store.cancels,
            estimates=store.estimates,
        )
        self.liveness = Liveness(
            cfg.liveness, store.devices, metrics, on_requeue=self.scheduler.wake
        )
        self.control = Control(
            store.devices,
            store.tasks,
            store.results,
            self.link,
            metrics,
            inbox=self.inbox,
            fleet=cfg.fleet,
            on_requeue=self._wake_scheduler_threadsafe,
            on_results=self._on_results,
            on_states=self._on_states,
            revoked=self.revoked,
        )
        self.features = self._features()

    def _features(self) -> list[Feature]:
        """Tasks, the model registry, federated jobs, releases and rollouts, each given what
        it uses."""
        cfg = self.config
        store = self.store
        self.auth = AuthFeature(cfg.auth, store.engine, self.metrics.registry)
        self.enrolment = EnrolmentFeature(
            cfg,
            self.auth,
            store.devices,
            self.metrics,
            self.accounts,
            self.revoked,
            base_url=self.base_url,
            wait_connected=self.link.wait_connected,
            on_requeue=self._wake_scheduler_threadsafe,
        )
        features: list[Feature] = [
            self.auth,
            self.enrolment,
            TasksFeature(
                self.scheduler,
                self.liveness,
                config=cfg,
                tasks=store.tasks,
                cancels=store.cancels,
                results=store.results,
                metrics=self.metrics,
                on_submit=self._wake_scheduler_threadsafe,
            ),
        ]
        try:
            from lepton.coordinator.fl.feature import FLFeature
            from lepton.coordinator.model_registry.feature import ModelRegistryFeature
            from lepton.coordinator.releases.feature import ReleasesFeature
            from lepton.coordinator.releases.install import install_params
            from lepton.coordinator.rollouts.feature import RolloutsFeature
            from lepton.coordinator.rollouts.targets import ReleasesLink
        except ImportError:  # pragma: no cover - the registry and FL are optional
            return features
        models = ModelRegistryFeature(
            cfg,
            self.store,
            Path(cfg.data_dir).expanduser(),
            base_url=self.base_url,
            on_submit=self._submitted,
            on_auth_refusal=lambda reason: self.auth.metrics.refusals.labels(reason).inc(),
        )
        # Train tasks name where devices fetch weights and upload: without HTTP here, that
        # is another replica's API (http.public_url).
        lead_fl = cfg.http.enabled or bool(cfg.http.public_url)
        if not lead_fl:
            log.warning("http is disabled and http.public_url unset: no federated rounds here")
        fl = FLFeature(
            cfg,
            self.store,
            models.registry,
            self.metrics.registry,
            base_url=self.base_url,
            estimator=lambda: self.scheduler.estimator,
            weights=self.scheduler.weights,
            on_submit=self._wake_scheduler,
            lead=lead_fl,
        )
        # Signed agent images and models, in the registry's blob store.
        releases = ReleasesFeature(
            cfg, self.store, models.registry, self.metrics.registry, base_url=self.base_url
        )
        rollouts = RolloutsFeature(
            cfg,
            self.store,
            registry=models.registry,
            releases=ReleasesLink(releases.releases, releases.updates, install_params),
            base_url=self.base_url,
            on_submit=self._submitted,
            metrics=self.metrics.registry,
        )
        releases.add_update_listener(rollouts.on_updates)
        return [*features, models, fl, releases, rollouts]

    def _create_tables(self) -> None:
        """The one place start-up makes the schema: the store's migrations bring an empty
        database to head (or refuse one at another revision, unless ``auto_upgrade``), under
        the store's start-up lock (replicas may start at the same moment); every feature's
        tables are then checked to exist."""
        self.store.create_schema(
            *(f.metadata for f in self.features if f.metadata is not None),
            auto_upgrade=self.config.database.auto_upgrade,
        )

    def base_url(self) -> str:
        """Where devices reach this coordinator's HTTP API (to fetch blobs, to upload):
        ``http.public_url``, or the server of this process."""
        if self.config.http.public_url:
            return self.config.http.public_url
        if self.http is None:
            raise RuntimeError("http is disabled: set http.public_url to a replica's API")
        return self.http.url

    def _app(self) -> FastAPI:
        """The HTTP app: the fleet registry's routes (runtime state every feature builds
        on), then every feature's."""
        store = self.store
        devices = make_devices_router(self.config, store.devices, store.tasks)
        return create_app(
            ApiContext(
                routers=[devices, *(r for f in self.features for r in f.routers())],
                config=self.config,
                devices=store.devices,
                tasks=store.tasks,
                ping=store.ping,
                metrics=self.metrics,
                started_at=self.started_at,
                is_leader=lambda: self.leadership.is_leader,
                mqtt_connected=lambda: self.link.connected,
                auth=self.auth.authenticator,
            )
        )

    def _on_results(self, outcomes: Sequence[ResultOutcome]) -> None:
        for feature in self.features:
            feature.on_results(outcomes)

    def _on_states(self, states: Sequence[StateUpdate]) -> None:  # worker thread
        for feature in self.features:
            feature.on_states(states)

    def _link_changed(self, up: bool) -> None:  # event loop
        self.metrics.mqtt_connected.set(1 if up else 0)
        self.liveness.link_changed(up)

    def _submitted(self, n: int) -> None:  # any thread: tasks were submitted (a deployment)
        self.metrics.task_transitions.labels("pending").inc(n)
        self._wake_scheduler_threadsafe()

    def _wake_scheduler(self) -> None:  # event loop
        with contextlib.suppress(RuntimeError):
            self.scheduler.wake()

    def _wake_scheduler_threadsafe(self) -> None:
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self.scheduler.wake)

    # ------------------------------------------------------------------ running

    async def _run(self) -> None:
        assert self._ready is not None
        async with self.link, asyncio.TaskGroup() as tg:
            tasks = {
                "registry": tg.create_task(self.registry.run(), name="registry"),
                "ingest": tg.create_task(self.control.run(), name="ingest"),
                "lease": tg.create_task(self.leadership.run(), name="lease"),
            }
            for feature in self.features:
                for name, loop in feature.leader_loops().items():
                    assert name not in tasks, f"feature {feature.name}: task {name} is taken"
                    tasks[name] = tg.create_task(self.leadership.lead(loop, name=name), name=name)
            if self.http is not None:
                tasks["http"] = tg.create_task(self.http.serve(), name="http")
            if self.metrics_http is not None:
                tasks["metrics-http"] = tg.create_task(self.metrics_http.serve(), name="metrics")
            self._ready.set_result(None)
            await self._stop.wait()
            log.info("coordinator %s draining", self.config.instance_id)
            try:
                async with asyncio.timeout(DRAIN_TIMEOUT_S):
                    await self._drain(tasks)
            except TimeoutError:
                log.warning("drain took longer than %.0fs; stopping anyway", DRAIN_TIMEOUT_S)
            await cancel_and_wait(tasks.values())
        self._stopped.set()
        log.info("coordinator %s stopped", self.config.instance_id)

    async def _drain(self, tasks: dict[str, asyncio.Task[None]]) -> None:
        for server in (self.http, self.metrics_http):
            if server is not None:
                server.stop()
        leading = [n for f in self.features for n in f.leader_loops()] + ["lease"]
        for name in leading:
            tasks[name].cancel()
        await asyncio.gather(*(tasks[n] for n in leading), return_exceptions=True)
        for feature in self.features:
            try:
                await feature.drain()
            except Exception:
                log.exception("feature %s: drain failed", feature.name)
        await self.leadership.release()
        self.ingest.accepting = False
        if self.control.request_stop():
            tasks["ingest"].cancel()
        await asyncio.gather(tasks["ingest"], return_exceptions=True)
        await self.control.drain()
        if self.registry.request_stop():
            tasks["registry"].cancel()
        await asyncio.gather(tasks["registry"], return_exceptions=True)
        await self.registry.flush()
        servers = [tasks[n] for n in ("http", "metrics-http") if n in tasks]
        await asyncio.gather(*servers, return_exceptions=True)


async def serve(config: Config) -> None:
    """Run a coordinator until SIGTERM or SIGINT (``lepton coordinator run``)."""
    loop = asyncio.get_running_loop()
    async with Coordinator(config) as coordinator:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, coordinator.stop)
        try:
            await coordinator.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
