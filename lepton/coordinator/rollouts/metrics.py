"""Prometheus metrics of staged rollouts, on the coordinator's own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter


class RolloutMetrics:
    """Rollout requests by outcome (created, or why refused), rollouts ended by state, and
    devices settled by kind and state."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.requests = Counter(
            "lepton_rollout_requests",
            "Rollout creations asked for, by outcome: created, invalid_plan, no_target,"
            " conflict, not_found",
            ["outcome"],
            registry=registry,
        )
        self.ended = Counter(
            "lepton_rollouts_ended",
            "Rollouts ended, by state (completed, aborted, failed)",
            ["kind", "state"],
            registry=registry,
        )
        self.devices = Counter(
            "lepton_rollout_devices",
            "Devices of rollouts that settled, by kind and state (succeeded, failed,"
            " rolled_back, timed_out, skipped, reverted)",
            ["kind", "state"],
            registry=registry,
        )
