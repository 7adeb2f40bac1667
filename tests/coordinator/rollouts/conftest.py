"""Rollouts over a real store (SQLite always, PostgreSQL when it answers): a model registry
with two servable versions of the digits model, a fleet of devices, and helpers that carry a
task through the store as a device would (placed, acknowledged, answered)."""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from lepton.coordinator.config import load as load_config
from lepton.coordinator.model_registry.registry import ModelRegistry
from lepton.coordinator.rollouts.control import RolloutControl
from lepton.coordinator.rollouts.runner import Runner
from lepton.coordinator.rollouts.store import RolloutStore
from lepton.coordinator.rollouts.targets import ReleaseSource, Targets
from lepton.coordinator.store import Assignment, Store
from lepton.protocol.messages import Result, TaskAck
from tests.coordinator.factories import sample

# A coordinator trusting a fresh release root, for the agent-image rollout tests.
from tests.coordinator.releases.conftest import releasing, root_file, trust  # noqa: F401

ARTIFACTS = Path(__file__).resolve().parents[3] / "lepton" / "models" / "artifacts"
BASE = "http://coordinator.example:8080"
_ids = itertools.count()


@pytest.fixture
def store(store: Store) -> Store:
    """The store, with the rollout and registry tables emptied too on the shared
    PostgreSQL schema (the shared fixture empties the store's own)."""
    if store.dialect == "postgresql":
        with store.engine.begin() as conn:
            conn.execute(text("TRUNCATE rollouts, rollout_devices, model_versions CASCADE"))
    return store


@pytest.fixture
def models(store: Store, tmp_path: Path) -> ModelRegistry:
    """digits v1 (FP32) and v2 (INT8), both servable."""
    registry = ModelRegistry(store.engine, tmp_path / "data")
    registry.import_file(
        ARTIFACTS / "digits_fp32.onnx", name="digits", format="onnx", precision="fp32"
    )
    registry.import_file(
        ARTIFACTS / "digits_int8.onnx", name="digits", format="onnx", precision="int8"
    )
    return registry


def add_devices(store: Store, n: int, *, prefix: str = "dev", **kw: Any) -> list[str]:
    ids = [f"{prefix}{i:02d}" for i in range(n)]
    store.devices.record_capacity([sample(i, **kw) for i in ids])
    return ids


class Rig:
    """A runner and the operator's side over one store."""

    def __init__(
        self, store: Store, models: ModelRegistry, releases: ReleaseSource | None = None
    ) -> None:
        self.store = store
        self.config = load_config(env={})
        self.rollouts = RolloutStore(store.engine)
        self.targets = Targets(models, releases, lambda: BASE)
        self.submitted = 0
        self.runner = Runner(
            self.config,
            self.rollouts,
            devices=store.devices,
            tasks=store.tasks,
            cancels=store.cancels,
            targets=self.targets,
            on_submit=self._count,
        )
        self.control = RolloutControl(self.config, self.rollouts, store.devices, self.targets)

    def _count(self, n: int) -> None:
        self.submitted += n

    def settle(self, rollout_id: str, now: float | None = None) -> None:
        """Step until nothing changes (as the leader loop does)."""
        for _ in range(50):
            if not self.runner.tick(rollout_id, time.time() if now is None else now).acted:
                return
        raise AssertionError("the rollout did not settle")

    def rows(self, rollout_id: str) -> dict[str, Any]:
        return {r.device_id: r for r in self.rollouts.devices(rollout_id)}

    def answer(
        self, task_id: str, status: str = "succeeded", output: dict[str, Any] | None = None
    ) -> None:
        """The task's device runs it and answers ``status`` with ``output``."""
        task = self.store.tasks.get_task(task_id)
        device = task.pinned_device
        assert device is not None
        now = time.time()
        (d,) = self.store.tasks.assign([Assignment(task_id=task_id, device_id=device)], now)
        self.store.tasks.mark_dispatched([(d.task_id, d.attempt)], now)
        self.store.tasks.apply_acks(device, [TaskAck(task_id=task_id, accepted=True)], now)
        result = Result(
            id=f"r{next(_ids)}",
            task_id=task_id,
            status=status,  # type: ignore[arg-type]
            attempt=d.attempt,
            output=output or {},
            error=None if status == "succeeded" else f"{status} on purpose",
            started_at=now,
            finished_at=now,
        )
        (out,) = self.store.results.apply_results(device, [result], now)
        assert out.outcome == "applied", out
        if status != "succeeded" and not self.store.tasks.get_task(task_id).terminal:
            self.answer(task_id, status, output)  # its retry fails the same way


@pytest.fixture
def rig(store: Store, models: ModelRegistry) -> Rig:
    return Rig(store, models)
