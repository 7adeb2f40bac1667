"""The installer: re-verification of what the agent staged (every refusal leaves the running
image alone and reports why), a real offline install of a tiny image into the inactive slot,
and the revert rules. (A kill at each installer step: test_installer_kills.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lepton.agent.update import slots
from tests.agent.update import images
from tests.agent.update.conftest import run_installer
from tests.agent.update.slotkit import fake_image, running, state
from tests.agent.update.tinyimage import stage_request


def test_install_then_trial(device: dict[str, Path], keys: images.Keys) -> None:
    stage_request(keys, device["state"], "1.0.0", floor="0.9.5")
    assert run_installer(device) == 0
    s = state(device["root"])
    assert s["trial"]["version"] == "1.0.0"
    assert s["trial"]["slot"] == "b"
    assert running(device["root"]) == "1.0.0"
    assert not (device["state"] / "update" / "request.json").exists()  # consumed
    assert slots.commit(device["root"], version="1.0.0", slot="b")
    assert state(device["root"])["floor"] == "0.9.5"  # from the slot's verified manifest


def _tamper(staging: Path) -> None:
    wheel = next((staging / "wheels").glob("*.whl"))
    wheel.write_bytes(wheel.read_bytes() + b"x")


def _link(staging: Path) -> None:
    # Same bytes, but through a link to a file outside the staging directory: refused (a
    # root process never copies what an agent-made link points at).
    wheel = next((staging / "wheels").glob("*.whl"))
    outside = staging.parent.parent / wheel.name
    outside.write_bytes(wheel.read_bytes())
    wheel.unlink()
    wheel.symlink_to(outside)


def _link_dir(staging: Path) -> None:
    moved = staging.parent.parent / "elsewhere"
    (staging / "wheels").rename(moved)
    (staging / "wheels").symlink_to(moved)


def _extra(staging: Path) -> None:
    (staging / "wheels" / "evil-1.0-py3-none-any.whl").write_bytes(b"not listed")


@pytest.mark.parametrize(
    ("case", "kwargs", "after", "reason"),
    [
        ("tampered", {}, _tamper, "tampered"),
        ("symlink", {}, _link, "missing_file"),
        ("symlinked_dir", {}, _link_dir, "missing_file"),
        ("unlisted", {}, _extra, None),  # only listed files are copied: installs fine
        ("wrong_class", {"device_classes": ("rpi5",)}, None, "wrong_class"),
        ("rollback", {"version": "0.9.0"}, None, "rollback"),
        ("expired", {"expires_in": -10}, None, "expired"),
        ("unknown_key", {"signer": "other"}, None, "unknown_key"),
    ],
)
def test_refusals_leave_the_running_image(
    device: dict[str, Path], keys: images.Keys, case: str, kwargs: dict[str, object],
    after: object, reason: str | None,
) -> None:  # fmt: skip
    version = str(kwargs.pop("version", "1.0.0"))
    if kwargs.get("signer") == "other":
        kwargs["signer"] = images.make_keys().release_key
    staging, _ = stage_request(keys, device["state"], version, **kwargs)  # type: ignore[arg-type]
    if callable(after):
        after(staging)  # the agent-writable staging changed after the agent verified it
    rc = run_installer(device)
    s = state(device["root"])
    if reason is None:
        assert rc == 0
        assert not (device["root"] / "slots/b/bundle/wheels/evil-1.0-py3-none-any.whl").exists()
        return
    assert rc == 1
    assert s["last"]["outcome"] == "install_failed"
    assert s["last"]["reason"].startswith(reason), s["last"]
    assert s["trial"] is None
    assert s["installing"] is None
    assert running(device["root"]) == "0.9.0"
    # Refused after the slot was marked (a file check): the half-written slot is emptied.
    assert (device["root"] / "slots/b").exists() == (reason not in ("tampered", "missing_file"))


def test_revert_rules(device: dict[str, Path]) -> None:
    root = device["root"]
    req = device["state"] / "update" / "request.json"
    req.write_text(json.dumps({"kind": "revert", "to_version": "0.8.0", "task_id": "r1"}))
    assert run_installer(device) == 1
    assert state(root)["last"]["reason"].startswith("no_previous")
    # b holds 0.8.0, committed before a: the floor (0.9.0) forbids going back to it.
    s = slots.read_state(root)
    s["previous"] = {"slot": "b", "version": "0.8.0"}
    s["floor"] = "0.9.0"
    slots.write_state(root, s)
    req.write_text(json.dumps({"kind": "revert", "to_version": "0.8.0", "task_id": "r2"}))
    assert run_installer(device) == 1
    assert state(root)["last"]["reason"].startswith("below_floor")
    s = slots.read_state(root)
    s["floor"] = "0.8.0"
    slots.write_state(root, s)
    fake_image(root, "b", "0.8.0")
    req.write_text(json.dumps({"kind": "revert", "to_version": "0.8.0", "task_id": "r3"}))
    assert run_installer(device) == 0
    assert state(root)["trial"]["kind"] == "revert"
    assert running(root) == "0.8.0"


def test_files_outside_staging_refused(device: dict[str, Path], keys: images.Keys) -> None:
    stage_request(keys, device["state"], "1.0.0")
    req = device["state"] / "update" / "request.json"
    request = json.loads(req.read_text())
    request["files"] = str(device["root"] / "slots" / "a")
    req.write_text(json.dumps(request))
    assert run_installer(device) == 1
    assert state(device["root"])["last"]["reason"].startswith("malformed")
