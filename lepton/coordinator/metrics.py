"""Prometheus metrics of one coordinator process (its own registry, served at /metrics).

Counters and histograms are updated where things happen (from any thread: the client library
is thread-safe). Fleet-wide gauges (devices by state, tasks by state) are read from the
database at scrape time, so every replica reports the same truth.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _FleetCollector(Collector):
    """Gauges computed from the store on each scrape."""

    def __init__(
        self,
        devices: Callable[[], dict[str, int]],
        tasks: Callable[[], dict[str, int]],
    ) -> None:
        self._devices = devices
        self._tasks = tasks

    def collect(self) -> Iterator[Metric]:
        try:
            devices, tasks = self._devices(), self._tasks()
        except Exception:  # a scrape must not fail because the database blinked
            log.warning("cannot read fleet gauges from the store", exc_info=True)
            return
        g = GaugeMetricFamily("lepton_devices", "Devices by state", labels=["state"])
        for state, n in sorted(devices.items()):
            g.add_metric([state], n)
        yield g
        t = GaugeMetricFamily("lepton_tasks", "Tasks by state", labels=["state"])
        for state, n in sorted(tasks.items()):
            t.add_metric([state], n)
        yield t


class Metrics:
    """Every metric the coordinator exports."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.ingest_messages = Counter(
            "lepton_ingest_messages",
            "Valid messages received from devices, by channel",
            ["channel"],
            registry=r,
        )
        self.ingest_bytes = Counter(
            "lepton_ingest_bytes", "Payload bytes received from devices", registry=r
        )
        self.ingest_rejects = Counter(
            "lepton_ingest_rejects",
            "Messages dropped or not applied, by reason",
            ["reason"],
            registry=r,
        )
        self.registry_flush_seconds = Histogram(
            "lepton_registry_flush_seconds",
            "Time to write one batch of capacity reports",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.registry_flush_devices = Histogram(
            "lepton_registry_flush_devices",
            "Devices written per capacity batch",
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000),
            registry=r,
        )
        self.registry_lag_seconds = Histogram(
            "lepton_registry_lag_seconds",
            "From a capacity report's arrival to its commit in the registry",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.results = Counter(
            "lepton_results", "Results received, by outcome", ["outcome"], registry=r
        )
        self.task_transitions = Counter(
            "lepton_task_transitions",
            "Task state changes made by this process, by new state",
            ["state"],
            registry=r,
        )
        self.task_cancels = Counter(
            "lepton_task_cancels",
            "Cancel requests by what they did: cancelled (a pending task, at once), requested"
            " (an assigned or running task: its device is told), finished (it had ended),"
            " unknown (no such task)",
            ["outcome"],
            registry=r,
        )
        self.cancels_sent = Counter(
            "lepton_task_cancels_sent",
            "Task cancels the broker accepted for devices (re-sends included)",
            registry=r,
        )
        self.scheduler_solve_seconds = Histogram(
            "lepton_scheduler_solve_seconds",
            "Time plan() took for one batch",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.scheduler_batch_tasks = Histogram(
            "lepton_scheduler_batch_tasks",
            "Tasks in one planned batch",
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000),
            registry=r,
        )
        self.scheduler_unassigned = Counter(
            "lepton_scheduler_unassigned",
            "Task placements the plan could not make",
            registry=r,
        )
        self.dispatch_failures = Counter(
            "lepton_dispatch_failures",
            "Task messages the broker did not accept (re-sent later)",
            registry=r,
        )
        self.devices_offline = Counter(
            "lepton_devices_offline_transitions",
            "Devices marked offline, by cause",
            ["cause"],
            registry=r,
        )
        self.http_rejects = Counter(
            "lepton_http_rejects",
            "HTTP requests and connections refused as client errors, by reason",
            ["reason"],
            registry=r,
        )
        self.leader = Gauge("lepton_leader", "1 while this process leads scheduling", registry=r)
        self.mqtt_connected = Gauge(
            "lepton_mqtt_connected", "1 while connected to the broker", registry=r
        )

    def watch_store(
        self, devices: Callable[[], dict[str, int]], tasks: Callable[[], dict[str, int]]
    ) -> None:
        """Export devices and tasks by state, read through these callables on scrape."""
        self.registry.register(_FleetCollector(devices, tasks))

    def reject(self, reason: str, n: int = 1) -> None:
        self.ingest_rejects.labels(reason).inc(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Current value of a sample (tests and the health endpoint)."""
        v = self.registry.get_sample_value(name, labels or {})
        return float(v) if v is not None else 0.0
