"""Rollouts on a real store: model rollouts through the normal task path (deploy, probe,
revert), timeouts, late joiners, operator moves; agent-image rollouts against a release
source that answers as the releases feature does."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from lepton.coordinator.errors import ConflictError
from lepton.coordinator.rollouts.plan import PhaseSpec, Plan, PlanError, ProbeSpec, SelectorSpec
from lepton.coordinator.rollouts.targets import DeviceUpdateLike
from lepton.coordinator.store import Store
from lepton.protocol.tasks import DEPLOY, INFER, INSTALL, REVERT, DeployParams, params_as
from tests.coordinator.rollouts.conftest import Rig, add_devices


def model_plan(**kw: Any) -> Plan:
    base: dict[str, Any] = {
        "kind": "model",
        "name": "digits",
        "version": "2",
        "phases": [PhaseSpec(count=2), PhaseSpec(percent=100.0)],
        "max_in_flight": 10,
        "abort_min_finished": 2,
        "abort_failure_share": 0.5,
    }
    base.update(kw)
    return Plan(**base)


def task_of(rig: Rig, rollout_id: str, device_id: str) -> Any:
    row = rig.rows(rollout_id)[device_id]
    assert row.task_id is not None, row
    return rig.store.tasks.get_task(row.task_id)


def test_a_model_rollout_deploys_phase_by_phase_to_completion(rig: Rig, store: Store) -> None:
    add_devices(store, 6)
    rec = rig.control.create(model_plan(), created_by="test")
    rig.settle(rec.id)
    started = [d for d, r in rig.rows(rec.id).items() if r.state == "dispatched"]
    assert len(started) == 2  # the canary
    for device_id in started:
        task = task_of(rig, rec.id, device_id)
        assert (task.kind, task.pinned_device) == (DEPLOY, device_id)
        assert params_as(DeployParams, task.params).precision == "int8"  # version 2
        rig.answer(task.id)
    rig.settle(rec.id)
    rows = rig.rows(rec.id)
    assert sum(r.state == "succeeded" for r in rows.values()) == 2
    assert sum(r.state == "dispatched" for r in rows.values()) == 4
    for device_id, row in rows.items():
        if row.state == "dispatched":
            rig.answer(task_of(rig, rec.id, device_id).id)
    rig.settle(rec.id)
    done = rig.rollouts.get(rec.id)
    assert done.state == "completed"
    assert done.ended_at is not None
    assert rig.rollouts.counts(rec.id)["succeeded"] == 6
    assert rig.rollouts.live() == []  # nothing left for the leader to step
    assert rig.submitted == 6


def test_a_failing_canary_aborts_and_reverts_to_the_previous_version(
    rig: Rig, store: Store
) -> None:
    add_devices(store, 6)
    rec = rig.control.create(
        model_plan(revert_on_abort=True, success_threshold=0.5), created_by="test"
    )
    rig.settle(rec.id)
    canary = sorted(d for d, r in rig.rows(rec.id).items() if r.state == "dispatched")
    rig.answer(task_of(rig, rec.id, canary[0]).id)
    rig.answer(task_of(rig, rec.id, canary[1]).id, "failed")
    rig.settle(rec.id)
    # 1 of 2 failed: not above 0.5, and 1 of 2 succeeded reaches the phase's 0.5.
    assert (rig.rollouts.get(rec.id).state, rig.rollouts.get(rec.id).phase) == ("running", 1)
    # A device takes part in one rollout of a kind at a time.
    with pytest.raises(ConflictError, match="devices in another model rollout"):
        rig.control.create(model_plan(), created_by="t")
    rig.control.move(rec.id, "abort", actor="op")
    # One more failure than allowed, in a rollout whose abort share is lower.
    rec2 = rig.control.create(
        model_plan(revert_on_abort=True, abort_failure_share=0.4), created_by="t"
    )
    rig.settle(rec2.id)
    canary2 = sorted(d for d, r in rig.rows(rec2.id).items() if r.state == "dispatched")
    rig.answer(task_of(rig, rec2.id, canary2[0]).id)
    rig.answer(task_of(rig, rec2.id, canary2[1]).id, "failed")
    rig.settle(rec2.id)
    ended = rig.rollouts.get(rec2.id)
    assert ended.state == "aborted"
    assert "1 of 2" in ended.reason
    rows = rig.rows(rec2.id)
    assert rows[canary2[1]].state == "failed"
    assert "failed on purpose" in rows[canary2[1]].reason
    assert {r.state for d, r in rows.items() if d not in canary2} == {"skipped"}
    reverting = rows[canary2[0]]
    assert reverting.state == "reverting"
    revert_task = task_of(rig, rec2.id, canary2[0])
    assert params_as(DeployParams, revert_task.params).precision == "fp32"  # version 1
    rig.answer(revert_task.id)
    rig.settle(rec2.id)
    assert rig.rows(rec2.id)[canary2[0]].state == "reverted"
    assert rec2.id not in {r.id for r in rig.rollouts.live()}


def test_a_probe_compares_the_new_version_with_the_device_baseline(rig: Rig, store: Store) -> None:
    add_devices(store, 2)
    plan = model_plan(
        phases=[PhaseSpec(percent=100.0)],
        probe=ProbeSpec(source="digits", max_accuracy_drop=0.02, max_latency_increase=0.5),
        abort_failure_share=1.0,
        success_threshold=0.0,
    )
    rec = rig.control.create(plan, created_by="test")
    rig.settle(rec.id)
    good, bad = sorted(rig.rows(rec.id))

    def infer(accuracy: float, p50: float) -> dict[str, Any]:
        return {"accuracy": accuracy, "latency_ms": {"sample": {"p50": p50}}}

    for device_id, (acc, p50) in ((good, (0.98, 1.0)), (bad, (0.98, 1.0))):
        baseline = task_of(rig, rec.id, device_id)
        assert baseline.kind == INFER
        rig.answer(baseline.id, output=infer(acc, p50))
    rig.settle(rec.id)
    for device_id in (good, bad):
        deploy = task_of(rig, rec.id, device_id)
        assert deploy.kind == DEPLOY
        rig.answer(deploy.id)
    rig.settle(rec.id)
    assert {r.state for r in rig.rows(rec.id).values()} == {"staged"}
    rig.answer(task_of(rig, rec.id, good).id, output=infer(0.975, 1.2))
    rig.answer(task_of(rig, rec.id, bad).id, output=infer(0.90, 1.0))
    rig.settle(rec.id)
    rows = rig.rows(rec.id)
    assert rows[good].state == "succeeded"
    assert rows[bad].state == "failed"
    assert "accuracy 0.9000 vs 0.9800" in rows[bad].reason
    # The model that failed its probe does not stay: version 1 is deployed back.
    assert rows[bad].reason.endswith("previous version deployed back")
    undo = task_of(rig, rec.id, bad)
    assert undo.kind == DEPLOY
    assert params_as(DeployParams, undo.params).precision == "fp32"
    assert rig.rollouts.get(rec.id).state == "completed"


def test_a_stuck_device_times_out_without_blocking(rig: Rig, store: Store) -> None:
    add_devices(store, 3)
    plan = model_plan(
        phases=[PhaseSpec(count=1), PhaseSpec(percent=100.0)],
        device_timeout_s=60.0,
        success_threshold=0.0,
        abort_failure_share=1.0,
    )
    rec = rig.control.create(plan, created_by="test")
    now = time.time()
    rig.settle(rec.id, now)
    (stuck,) = [d for d, r in rig.rows(rec.id).items() if r.state == "dispatched"]
    rig.settle(rec.id, now + 30)
    assert rig.rows(rec.id)[stuck].state == "dispatched"
    rig.settle(rec.id, now + 61)
    rows = rig.rows(rec.id)
    assert rows[stuck].state == "timed_out"
    assert "60s" in rows[stuck].reason
    # Its task is cancelled: a late answer is not taken for an update.
    assert task_of(rig, rec.id, stuck).state == "cancelled"
    assert sum(r.state == "dispatched" for r in rows.values()) == 2  # the rollout went on


def test_late_joiners_join_the_pending_pool(rig: Rig, store: Store) -> None:
    add_devices(store, 2, device_class="rpi5")
    rec = rig.control.create(
        model_plan(selector=SelectorSpec(device_class="rpi5")), created_by="test"
    )
    add_devices(store, 1, prefix="late", device_class="rpi5")
    add_devices(store, 1, prefix="other", device_class="jetson")
    rig.settle(rec.id)
    assert set(rig.rows(rec.id)) == {"dev00", "dev01", "late00"}


def test_operator_moves_and_the_approval_gate(rig: Rig, store: Store) -> None:
    add_devices(store, 4)
    plan = model_plan(phases=[PhaseSpec(count=1), PhaseSpec(percent=100.0, approval=True)])
    rec = rig.control.create(plan, created_by="test")
    rig.settle(rec.id)
    (first,) = [d for d, r in rig.rows(rec.id).items() if r.state == "dispatched"]
    rig.control.move(rec.id, "pause", actor="op")
    with pytest.raises(ConflictError):
        rig.control.move(rec.id, "pause", actor="op")
    rig.answer(task_of(rig, rec.id, first).id)
    rig.settle(rec.id)
    assert rig.rollouts.get(rec.id).state == "paused"
    rig.control.move(rec.id, "resume", actor="op")
    rig.settle(rec.id)
    held = rig.rollouts.get(rec.id)
    assert (held.state, held.phase) == ("waiting_approval", 1)
    assert rig.rollouts.counts(rec.id)["dispatched"] == 0
    # Paused while waiting, then approved: the approval is for the phase that waited.
    rig.control.move(rec.id, "pause", actor="op")
    approved = rig.control.move(rec.id, "approve", actor="op")
    assert approved.approved == (1,)
    assert approved.state == "paused"
    rig.settle(rec.id)
    assert rig.rollouts.counts(rec.id)["dispatched"] == 0
    rig.control.move(rec.id, "resume", actor="op")
    rig.settle(rec.id)
    assert rig.rollouts.counts(rec.id)["dispatched"] == 3
    aborted = rig.control.move(rec.id, "abort", actor="op", revert=False)
    assert aborted.state == "aborted"
    assert aborted.reason == "aborted by op"
    with pytest.raises(ConflictError):
        rig.control.move(rec.id, "resume", actor="op")


def test_plans_that_cannot_run_are_refused(rig: Rig, store: Store) -> None:
    add_devices(store, 1, device_class="rpi5")
    with pytest.raises(PlanError, match="no device matches"):
        rig.control.create(model_plan(selector=SelectorSpec(device_class="jetson")), created_by="t")
    with pytest.raises(PlanError, match="last phase"):
        rig.control.create(model_plan(phases=[PhaseSpec(count=1)]), created_by="t")
    with pytest.raises(PlanError, match="not a model version"):
        rig.control.create(model_plan(version="1.2.3"), created_by="t")
    with pytest.raises(Exception, match="digits"):
        rig.control.create(model_plan(version="9"), created_by="t")
    assert rig.rollouts.list_rollouts() == []


# ---------------------------------------------------------------- agent images


@dataclass(frozen=True)
class Update:
    version: str
    outcome: str
    target: str | None
    reason: str = ""
    task_id: str | None = None


@dataclass
class Releases:
    """Answers as the releases feature does: builds for rpi5 only, update statuses as the
    devices report them."""

    statuses: dict[str, Update] = field(default_factory=dict)

    def install(
        self, name: str, version: str, device_class: str | None, **kw: Any
    ) -> dict[str, Any] | None:
        if device_class != "rpi5":
            return None
        return {
            "release": name,
            "version": version,
            "manifest_digest": "a" * 64,
            "manifest_size": 100,
            "manifest_url": "http://c/v1/blobs/" + "a" * 64,
            "blob_base": "http://c/v1/blobs/",
            "health_deadline_s": kw["health_deadline_s"],
            "rollout": kw["rollout"],
        }

    def updates(self, device_ids: Any) -> dict[str, DeviceUpdateLike]:
        return {d: self.statuses[d] for d in device_ids if d in self.statuses}


def test_an_agent_rollout_succeeds_on_commit_and_fails_with_the_device_reason(
    store: Store, models: Any
) -> None:
    releases = Releases()
    rig = Rig(store, models, releases)
    add_devices(store, 3, device_class="rpi5")
    releases.statuses = {f"dev0{i}": Update("1.3.0", "committed", "1.3.0") for i in range(3)}
    add_devices(store, 1, prefix="jet", device_class="jetson")
    plan = Plan(
        kind="agent",
        name="lepton-agent",
        version="1.4.0",
        abort_failure_share=1.0,
        success_threshold=0.0,
        revert_on_abort=False,
    )
    # dev02 refused this version before, in another task: that is not this attempt's answer.
    releases.statuses["dev02"] = Update("1.3.0", "refused", "1.4.0", "expired", task_id="t-old")
    rec = rig.control.create(plan, created_by="test")
    rig.settle(rec.id)
    rows = rig.rows(rec.id)
    assert set(rows) == {"dev00", "dev01", "dev02"}  # no build for the jetson
    assert rows["dev02"].state == "dispatched"
    tasks = {d: task_of(rig, rec.id, d) for d in rows}
    assert {t.kind for t in tasks.values()} == {INSTALL}
    assert tasks["dev00"].params["rollout"] == rec.id
    staged = {"outcome": "staged", "release": "lepton-agent", "version": "1.4.0"}
    rig.answer(tasks["dev00"].id, output=staged)
    rig.answer(tasks["dev01"].id, output=staged)
    rig.answer(
        tasks["dev02"].id,
        output={**staged, "outcome": "refused", "reason": "bad_signature"},
    )
    rig.settle(rec.id)
    rows = rig.rows(rec.id)
    assert (rows["dev00"].state, rows["dev01"].state) == ("staged", "staged")
    assert rows["dev02"].state == "failed"
    assert "bad_signature" in rows["dev02"].reason
    assert rows["dev00"].from_version == "1.3.0"
    releases.statuses["dev00"] = Update("1.4.0", "committed", "1.4.0")
    releases.statuses["dev01"] = Update("1.3.0", "rolled_back", "1.4.0", "health deadline")
    rig.settle(rec.id)
    rows = rig.rows(rec.id)
    assert rows["dev00"].state == "succeeded"
    assert (rows["dev01"].state, rows["dev01"].reason) == ("rolled_back", "health deadline")
    assert rig.rollouts.get(rec.id).state == "completed"
    # Abort with revert: the committed device goes back to the version it ran before.
    rec2 = rig.control.create(
        Plan(
            kind="agent",
            name="lepton-agent",
            version="1.5.0",
            selector=SelectorSpec(device_ids=["dev00", "dev01"]),
        ),
        created_by="test",
    )
    rig.settle(rec2.id)
    for device_id in ("dev00", "dev01"):
        rig.answer(task_of(rig, rec2.id, device_id).id, output={**staged, "version": "1.5.0"})
    releases.statuses["dev00"] = Update("1.5.0", "committed", "1.5.0")
    rig.settle(rec2.id)
    assert rig.rows(rec2.id)["dev00"].state == "succeeded"
    rig.control.move(rec2.id, "abort", actor="op", revert=True)
    rig.settle(rec2.id)
    rows = rig.rows(rec2.id)
    assert rows["dev00"].state == "reverting"
    assert rows["dev01"].state == "staged"  # in flight: it goes on, and back if it commits
    revert = task_of(rig, rec2.id, "dev00")
    assert (revert.kind, revert.params["to_version"]) == (REVERT, "1.4.0")
    rig.answer(revert.id, output={"outcome": "staged", "version": "1.4.0"})
    releases.statuses["dev00"] = Update("1.4.0", "reverted", "1.4.0")
    releases.statuses["dev01"] = Update("1.5.0", "committed", "1.5.0")
    rig.settle(rec2.id)
    rows = rig.rows(rec2.id)
    assert rows["dev00"].state == "reverted"
    assert rows["dev01"].state == "reverting"
    assert task_of(rig, rec2.id, "dev01").params["to_version"] == "1.3.0"
