"""The simulated A/B updater: real trust root and manifests, simulated slots and trial."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import msgspec
import pytest

from lepton.common.releases import ReleaseRefused, check_policy, verify_manifest
from lepton.common.signing import generate_key, public_key, sign
from lepton.protocol.releases import (
    MANIFEST_TYPE,
    ROOT_TYPE,
    AgentInstall,
    FileEntry,
    Manifest,
    Root,
)
from lepton.sim.updater import CRASH_MARKER, SimulatedUpdater, UpdateFail

ROOT_KEY = generate_key()
RELEASE_KEY = generate_key()


def write_root(path: Path) -> Path:
    root = Root(
        version=1,
        expires=int(time.time()) + 3600,
        root_keys=[public_key(ROOT_KEY)],
        release_keys=[public_key(RELEASE_KEY)],
    )
    path.write_bytes(sign(msgspec.json.encode(root), ROOT_TYPE, [ROOT_KEY]))
    return path


def signed(version: str, *, files: tuple[str, ...] = ("wheels/x.whl",), floor: str = "0.0.0"):
    m = Manifest(
        kind="agent",
        name="lepton-agent",
        version=version,
        device_classes=["rpi*"],
        files=[
            FileEntry(path=p, sha256=hashlib.sha256(p.encode()).hexdigest(), length=1)
            for p in files
        ],
        security_floor=floor,
        created=int(time.time()),
        expires=int(time.time()) + 3600,
        install=AgentInstall(requirement="lepton-fleet"),
    )
    return sign(msgspec.json.encode(m), MANIFEST_TYPE, [RELEASE_KEY])


def updater(tmp_path: Path, fail: UpdateFail | None = None) -> tuple[SimulatedUpdater, list[int]]:
    restarts: list[int] = []
    u = SimulatedUpdater(
        device_id="sim-rpi4-0001",
        state_dir=tmp_path / "dev",
        root_file=write_root(tmp_path / "root.json"),
        version="1.0.0",
        fail=fail,
        trial_s=0.0,
    )
    u.restart = lambda: restarts.append(1)
    return u, restarts


def stage(u: SimulatedUpdater, raw: bytes, task_id: str) -> None:
    # What the install handler does before it hands over: the real checks.
    m = verify_manifest(raw, u.trust_root(), now=time.time())
    check_policy(m, kind="agent", device_class="rpi4", running=u.running_version(), floor=u.floor())
    u.stage(
        manifest_raw=raw,
        manifest=m,
        files_dir=u.staging_dir(task_id),
        task_id=task_id,
        deadline_s=60,
    )


async def test_install_trial_commit_then_revert_to_the_other_slot(tmp_path: Path) -> None:
    u, restarts = updater(tmp_path)
    seen: list[str] = []
    u.add_listener(lambda s: seen.append(s.outcome))
    assert (u.running_version(), u.status().outcome, u.status().slot) == ("1.0.0", "none", "a")

    stage(u, signed("1.1.0", floor="1.0.0"), "t1")
    assert u.status().outcome == "staged"
    assert restarts == [1]
    assert u.running_version() == "1.0.0"  # until the agent restarts
    u.boot()
    assert (u.running_version(), u.status().outcome, u.status().slot) == ("1.1.0", "trial", "b")
    await u.trial()
    s = u.status()
    assert (s.version, s.outcome, s.target, s.floor, s.task_id) == (
        "1.1.0",
        "committed",
        "1.1.0",
        "1.0.0",
        "t1",
    )
    # The same release again is a rollback for the device's real policy check.
    with pytest.raises(ReleaseRefused) as refused:
        stage(u, signed("1.1.0"), "t2")
    assert refused.value.reason == "rollback"

    with pytest.raises(ReleaseRefused):
        u.request_revert(to_version="0.9.0", task_id="r0", deadline_s=60)
    u.request_revert(to_version="1.0.0", task_id="r1", deadline_s=60)
    u.boot()
    await u.trial()
    assert (u.running_version(), u.status().outcome, u.status().slot) == ("1.0.0", "reverted", "a")
    assert seen == ["staged", "trial", "committed", "staged", "trial", "reverted"]
    # The state survives the process: a new updater on the same directory runs 1.0.0 in a.
    again = SimulatedUpdater(
        device_id="sim-rpi4-0001",
        state_dir=tmp_path / "dev",
        root_file=tmp_path / "root.json",
        version="0.1.0",
    )
    assert (again.running_version(), again.floor()) == ("1.0.0", "1.0.0")


async def test_a_failing_trial_rolls_back_to_the_old_slot(tmp_path: Path) -> None:
    u, restarts = updater(tmp_path, UpdateFail(share=1.0, versions=frozenset({"1.2.0"})))
    stage(u, signed("1.2.0"), "t1")
    u.boot()
    assert u.in_trial
    assert u.running_version() == "1.2.0"
    await u.trial()
    s = u.status()
    assert (s.version, s.outcome, s.target, s.reason, s.slot) == (
        "1.0.0",
        "rolled_back",
        "1.2.0",
        "crash_loop",
        "a",
    )
    assert restarts == [1, 1]  # into the trial, and back out of it
    assert not u.in_trial
    # Nothing committed in the failed slot: a revert to it is refused.
    with pytest.raises(ReleaseRefused):
        u.request_revert(to_version="1.2.0", task_id="r", deadline_s=60)


async def test_a_bundle_with_the_crash_marker_fails_everywhere(tmp_path: Path) -> None:
    u, _ = updater(tmp_path)
    stage(u, signed("1.3.0", files=("wheels/x.whl", f"sim/{CRASH_MARKER}")), "t1")
    u.boot()
    await u.trial()
    assert u.status().outcome == "rolled_back"
    assert u.running_version() == "1.0.0"


def test_update_fail_picks_the_same_share_of_devices_every_time() -> None:
    fail = UpdateFail.parse("0.2:1.2.0,1.4.0")
    ids = [f"sim-rpi4-{i:04d}" for i in range(2000)]
    failing = [i for i in ids if fail.fails(i, "1.2.0")]
    assert 0.17 < len(failing) / len(ids) < 0.23
    assert failing == [i for i in ids if UpdateFail.parse("0.2:1.2.0").fails(i, "1.2.0")]
    assert not any(fail.fails(i, "1.3.0") for i in ids)
    # Another version fails on other devices.
    assert failing != [i for i in ids if fail.fails(i, "1.4.0")]
    for bad in ("0.2", "1.5:1.0.0", "0.1:1.0"):
        with pytest.raises(ValueError, match=r"update_fail|version"):
            UpdateFail.parse(bad)


def test_lepton_sim_refuses_a_malformed_update_fail(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lepton.sim.cli import main

    argv = ["--devices", "1", "--state-root", str(tmp_path), "--host-gflops", "10"]
    assert main([*argv, "--update-fail", "0.2"]) == 2
    assert "SHARE:VERSION" in capsys.readouterr().err
    assert main([*argv, "--update-fail", "2:1.0.0", "--release-root", "root.json"]) == 2
    assert "share" in capsys.readouterr().err
