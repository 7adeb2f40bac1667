"""A kill (SIGKILL) at each step of a real install, then ``lepton-slot boot``: the device
always comes back on a committed image, or on the new image's bounded trial."""

from __future__ import annotations

from pathlib import Path

import pytest

from lepton.agent.update import slots
from tests.agent.update import images
from tests.agent.update.conftest import run_installer
from tests.agent.update.slotkit import assert_bootable, lepton_slot, running, state
from tests.agent.update.tinyimage import stage_request

INSTALL_POINTS = [
    "install.marked",
    "install.slot_cleared",
    "install.files_copied",
    "install.venv_built",
    "install.smoked",
    "trial.written",
    "trial.switched",
]


@pytest.mark.parametrize("point", INSTALL_POINTS)
def test_kill_installer_at_step_then_boot(
    device: dict[str, Path], keys: images.Keys, point: str
) -> None:
    root = device["root"]
    # b holds a previously committed 0.8.0: the install must never leave it named `previous`
    # while it is half written.
    s = slots.read_state(root)
    s["previous"] = {"slot": "b", "version": "0.8.0"}
    slots.write_state(root, s)
    stage_request(keys, device["state"], "1.0.0")
    assert run_installer(device, crash_at=point) == -9, state(root)["last"]
    assert state(root)["previous"] is None  # cleared before the slot was touched
    done = lepton_slot(root, "boot")
    assert done.returncode == 0, done.stderr
    assert_bootable(root)
    s = state(root)
    if s["trial"] is None:
        assert running(root) == "0.9.0"
        assert s["last"]["outcome"] in ("install_failed", "rolled_back")
        assert s["last"]["reason"] == "interrupted"
    else:  # killed after the switch: the new image is on trial (and bounded by it)
        assert running(root) == "1.0.0"
        assert s["trial"]["boots"] == 1
