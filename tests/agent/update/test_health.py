"""The trial gate and the agent-side updater: the self-test with the real ONNX Runtime, the
gate's verdicts in both modes, what ``lepton-slot service`` does with them, the status the
birth message carries, and revert requests."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path

import msgspec
import numpy as np
import pytest

from lepton.agent.config import UpdateConfig, load_config
from lepton.agent.update import slots
from lepton.agent.update.health import HealthChecks, UnhealthyError, run_self_test
from lepton.agent.update.updater import Updater
from lepton.common.releases import ReleaseRefused
from lepton.protocol.messages import UpdateStatus
from lepton.protocol.releases import FileEntry, Manifest, SelfTest
from tests.agent.update.slotkit import make_root, state

NOW = 1_800_000_000


def _self_test_files(bundle: Path, *, flip: bool = False) -> SelfTest:
    from tests.agent.inference.conftest import linear_onnx

    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3)).astype(np.float32)
    b = np.zeros(3, np.float32)
    x = rng.normal(size=(32, 4)).astype(np.float32)
    y = (x @ w + b).argmax(axis=1)
    if flip:
        y = (y + 1) % 3  # what a broken model build would disagree with
    (bundle / "selftest").mkdir(parents=True, exist_ok=True)
    (bundle / "selftest/model.onnx").write_bytes(linear_onnx(w, b))
    np.savez(bundle / "selftest/inputs.npz", x=x)
    np.savez(bundle / "selftest/expected.npz", y=y)
    return SelfTest(
        model="selftest/model.onnx",
        inputs="selftest/inputs.npz",
        expected="selftest/expected.npz",
        min_agreement=0.99,
    )


def test_self_test_passes_and_fails(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    good = _self_test_files(tmp_path / "good")
    run_self_test(tmp_path / "good", good)
    bad = _self_test_files(tmp_path / "bad", flip=True)
    with pytest.raises(UnhealthyError, match=r"agreement 0\.000 < 0\.99"):
        run_self_test(tmp_path / "bad", bad)
    (tmp_path / "good/selftest/model.onnx").write_bytes(b"not a model")
    with pytest.raises(UnhealthyError, match="self_test: "):
        run_self_test(tmp_path / "good", good)


def _trial_root(tmp_path: Path, *, self_test: SelfTest | None = None, floor: str = "0.9.5") -> Path:
    root = make_root(tmp_path, b="1.0.0")
    manifest = Manifest(
        kind="agent", name="lepton-agent", version="1.0.0", device_classes=["*"],
        files=[FileEntry(path="x", sha256="0" * 64, length=0)], security_floor=floor,
        created=NOW, expires=NOW + 10, self_test=self_test,
    )  # fmt: skip
    envelope = {
        "payloadType": "x",
        "payload": base64.b64encode(msgspec.json.encode(manifest)).decode(),
        "signatures": [],
    }
    (root / "slots/b/manifest.dsse.json").write_text(json.dumps(envelope))
    slots.begin_trial(root, slot="b", version="1.0.0", deadline=9e9, task_id="t1",
                      kind="install")  # fmt: skip
    return root


def _updater(root: Path, tmp_path: Path, mode: str = "direct") -> Updater:
    cfg = UpdateConfig(enabled=True, root=root, mode=mode, restart_command="")  # type: ignore[arg-type]
    return Updater(cfg, tmp_path / "state")


def _checks(connected: bool = True) -> HealthChecks:
    ev1, ev2 = asyncio.Event(), asyncio.Event()
    if connected:
        ev1.set()
        ev2.set()
    return HealthChecks(connected=ev1, first_report=ev2)


async def test_direct_trial_commits_and_reports(tmp_path: Path) -> None:
    root = _trial_root(tmp_path)
    up = _updater(root, tmp_path)
    seen: list[UpdateStatus] = []
    up.add_listener(seen.append)
    assert up.status().outcome == "trial"
    assert up.running_version() == "1.0.0"
    await up.trial(_checks())
    s = state(root)
    assert s["committed"] == {"slot": "b", "version": "1.0.0"}
    assert s["floor"] == "0.9.5"
    status = seen[-1]
    assert (status.outcome, status.version, status.slot, status.floor, status.task_id) == (
        "committed", "1.0.0", "b", "0.9.5", "t1",
    )  # fmt: skip


async def test_direct_trial_unhealthy_rolls_back_with_reason(tmp_path: Path) -> None:
    root = _trial_root(tmp_path)
    s = slots.read_state(root)
    s["trial"]["deadline"] = time.time() + 0.3
    slots.write_state(root, s)
    up = _updater(root, tmp_path)
    with pytest.raises(UnhealthyError, match="broker_unreachable"):
        await up.trial(_checks(connected=False))
    last = state(root)["last"]
    assert (last["outcome"], last["reason"]) == ("rolled_back", "unhealthy: broker_unreachable")
    assert slots.current_slot(root) == "a"


async def test_self_test_gate_in_the_trial(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    bundle = tmp_path / "opt-lepton/slots/b/bundle"
    test = _self_test_files(bundle, flip=True)
    root = _trial_root(tmp_path, self_test=test)
    with pytest.raises(UnhealthyError, match="self_test"):
        await _updater(root, tmp_path).trial(_checks())
    assert state(root)["last"]["reason"].startswith("unhealthy: self_test: agreement")


async def test_service_mode_writes_verdicts_the_service_acts_on(tmp_path: Path) -> None:
    root = _trial_root(tmp_path)
    up = _updater(root, tmp_path, mode="service")
    await up.trial(_checks())
    verdict = json.loads((tmp_path / "state/update/health.json").read_text())
    assert verdict["healthy"] is True
    assert state(root)["trial"] is not None  # the agent cannot commit in service mode
    verdict["floor"] = "99.0.0"  # a verdict's floor is never taken: the slot manifest's is
    (tmp_path / "state/update/health.json").write_text(json.dumps(verdict))
    assert slots.service(root, tmp_path / "state", restart=None) == "committed"
    assert state(root)["floor"] == "0.9.5"
    assert not (tmp_path / "state/update/health.json").exists()
    # A verdict naming no running trial is ignored.
    (tmp_path / "state/update/health.json").write_text(json.dumps(verdict))
    assert slots.service(root, tmp_path / "state", restart=None) == "verdict_ignored"


async def test_service_mode_unhealthy_verdict_rolls_back(tmp_path: Path) -> None:
    root = _trial_root(tmp_path)
    s = slots.read_state(root)
    s["trial"]["deadline"] = time.time() + 0.2
    slots.write_state(root, s)
    up = _updater(root, tmp_path, mode="service")
    with pytest.raises(UnhealthyError):
        await up.trial(_checks(connected=False))
    s = slots.read_state(root)
    assert s["trial"] is not None
    s["trial"]["deadline"] = 9e9  # the verdict, not the deadline check, ends this trial
    slots.write_state(root, s)
    assert slots.service(root, tmp_path / "state", restart=None) == "rolled_back"
    last = state(root)["last"]
    assert (last["outcome"], last["reason"]) == ("rolled_back", "unhealthy: broker_unreachable")
    assert slots.current_slot(root) == "a"


def test_request_revert_refusals(tmp_path: Path) -> None:
    root = make_root(tmp_path, b="0.8.0")
    up = _updater(root, tmp_path, mode="service")
    with pytest.raises(ReleaseRefused) as info:
        up.request_revert(to_version="0.8.0", task_id="r", deadline_s=60)
    assert info.value.reason == "rollback"
    s = slots.read_state(root)
    s.update(previous={"slot": "b", "version": "0.8.0"}, floor="0.9.0")
    slots.write_state(root, s)
    with pytest.raises(ReleaseRefused) as info:
        up.request_revert(to_version="0.8.0", task_id="r", deadline_s=60)
    assert info.value.reason == "below_floor"
    s["floor"] = "0.8.0"
    slots.write_state(root, s)
    up.request_revert(to_version="0.8.0", task_id="r", deadline_s=60)
    request = json.loads((tmp_path / "state/update/request.json").read_text())
    assert request == {"kind": "revert", "task_id": "r", "to_version": "0.8.0", "deadline_s": 60.0}
    assert up.status().outcome == "staged"


def test_update_config(tmp_path: Path) -> None:
    cfg = load_config(env={}).update
    assert (cfg.root, cfg.root_file, cfg.mode) == (
        Path("/opt/lepton"), Path("/etc/lepton/release-root.json"), "service",
    )  # fmt: skip
    assert cfg.restart_command == "systemctl restart --no-block lepton-agent.service"
    root = tmp_path / "r"
    root.mkdir()
    env = {"LEPTON_UPDATE_ROOT": str(root), "LEPTON_UPDATE_ROOT_FILE": str(tmp_path / "rf")}
    assert not load_config(env=env).update.active  # no pinned root: off
    (tmp_path / "rf").write_text("{}")
    assert load_config(env=env).update.active
    assert not load_config(env={**env, "LEPTON_UPDATE_ENABLED": "false"}).update.active
    with pytest.raises(Exception, match="LEPTON_UPDATE_NOPE"):
        load_config(env={"LEPTON_UPDATE_NOPE": "1"})
