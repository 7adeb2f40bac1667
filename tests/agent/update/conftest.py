"""Fixtures of the update tests: signing keys, and a device root with a stand-in image."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lepton.agent.update import slots
from tests.agent.update import images
from tests.agent.update.slotkit import make_root

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def keys() -> images.Keys:
    return images.make_keys()


@pytest.fixture
def device(tmp_path: Path, keys: images.Keys) -> dict[str, Path]:
    root = make_root(tmp_path, a="0.9.0")
    (root / "slots" / "b").mkdir()
    root_file = tmp_path / "release-root.json"
    root_file.write_bytes(keys.root_json)
    state_dir = tmp_path / "state"
    (state_dir / "update").mkdir(parents=True)
    config = tmp_path / "agent.toml"
    config.write_text(f'[agent]\nstate_dir = "{state_dir}"\n')
    return {"root": root, "root_file": root_file, "state": state_dir, "config": config}


def run_installer(dev: dict[str, Path], *, crash_at: str | None = None) -> int:
    """The installer as a process (as the service runs it), with this tree's lepton."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(slots.CRASH_ENV, None)
    if crash_at:
        env[slots.CRASH_ENV] = crash_at
    done = subprocess.run(
        [sys.executable, "-m", "lepton.agent.update.installer", "--root", str(dev["root"]),
         "--state-dir", str(dev["state"]), "--config", str(dev["config"]),
         "--root-file", str(dev["root_file"]), "--device-class", images.DEVICE_CLASS,
         "--restart-command", ""],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )  # fmt: skip
    if done.returncode not in (0, 1, -9) or (done.returncode == 1 and crash_at):
        print(done.stderr[-2000:])
    return done.returncode
