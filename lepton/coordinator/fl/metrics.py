"""Prometheus metrics of federated jobs, on the coordinator's own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

ROUND_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class FLMetrics:
    """Uploads accepted and refused (by reason), rounds by outcome, round wall time."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.uploads = Counter(
            "lepton_fl_uploads", "Model updates recorded (first copy of each)", registry=registry
        )
        self.upload_bytes = Counter(
            "lepton_fl_upload_bytes", "Bytes of model updates recorded", registry=registry
        )
        self.duplicates = Counter(
            "lepton_fl_upload_duplicates",
            "Uploads of an update already recorded (counted once, answered 200)",
            registry=registry,
        )
        self.rejects = Counter(
            "lepton_fl_upload_rejects",
            "Model update uploads refused, by reason",
            ["reason"],
            registry=registry,
        )
        self.rounds = Counter(
            "lepton_fl_rounds", "Federated rounds ended, by outcome", ["outcome"], registry=registry
        )
        self.job_failures = Counter(
            "lepton_fl_job_failures",
            "Federated jobs failed by their own code, by reason (model_error, crashed_loader)",
            ["reason"],
            registry=registry,
        )
        self.screened = Counter(
            "lepton_fl_updates_screened",
            "Updates refused or clamped before aggregation, by reason",
            ["reason"],
            registry=registry,
        )
        self.job_refusals = Counter(
            "lepton_fl_job_refusals",
            "Federated jobs refused at submission, by the key at fault",
            ["key"],
            registry=registry,
        )
        self.tasks_cancelled = Counter(
            "lepton_fl_tasks_cancelled",
            "Train tasks cancelled by their job, by reason (round_closed: a straggler of a"
            " closed round; round_failed; job_stopped, job_done, job_failed: the job ended)",
            ["reason"],
            registry=registry,
        )
        self.round_seconds = Histogram(
            "lepton_fl_round_seconds",
            "Wall time of a closed round, from its start to its aggregation",
            buckets=ROUND_BUCKETS,
            registry=registry,
        )
