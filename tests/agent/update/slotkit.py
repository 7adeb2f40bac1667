"""Helpers for the slot tests: an image root with stand-in images, and the installed
``lepton-slot`` run the way a device runs it (``/usr/bin/python3``, no lepton importable)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from lepton.agent.update import slots

SLOTS_PY = Path(slots.__file__)
#: The device runs lepton-slot with the system's interpreter; use it where there is one.
SYSTEM_PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable


def fake_image(root: Path, slot: str, version: str) -> None:
    """A slot whose ``venv/bin/lepton-agent version`` prints ``version``."""
    bin_dir = root / "slots" / slot / "venv" / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    exe = bin_dir / "lepton-agent"
    exe.write_text(f"#!/bin/sh\necho {version}\n")
    exe.chmod(0o755)


def make_root(tmp: Path, *, a: str = "0.9.0", b: str | None = None) -> Path:
    root = tmp / "opt-lepton"
    (root / "bin").mkdir(parents=True)
    shutil.copyfile(SLOTS_PY, root / "bin" / "lepton-slot")
    fake_image(root, "a", a)
    if b is not None:
        fake_image(root, "b", b)
    slots.provision(root, slot="a", version=a)
    return root


def clean_env() -> dict[str, str]:
    """An environment where nothing of lepton can be imported (as under systemd)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", slots.CRASH_ENV)}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def lepton_slot(
    root: Path, *args: str, crash_at: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = clean_env()
    if crash_at:
        env[slots.CRASH_ENV] = crash_at
    return subprocess.run(
        [SYSTEM_PYTHON, "-I", str(root / "bin" / "lepton-slot"), "--root", str(root), *args],
        capture_output=True, text=True, timeout=30, env=env, check=False,
    )  # fmt: skip


def run_driver(root: Path, code: str, *, crash_at: str | None) -> subprocess.CompletedProcess[str]:
    """Run ``code`` with ``m`` = the installed lepton-slot module and ``root`` defined."""
    prelude = (
        "import importlib.machinery, importlib.util, sys, pathlib\n"
        f"root = pathlib.Path({str(root)!r})\n"
        "spec = importlib.util.spec_from_loader('slots', importlib.machinery.SourceFileLoader("
        "'slots', str(root / 'bin' / 'lepton-slot')))\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
    )
    env = clean_env()
    if crash_at:
        env[slots.CRASH_ENV] = crash_at
    return subprocess.run(
        [SYSTEM_PYTHON, "-I", "-c", prelude + code],
        capture_output=True, text=True, timeout=30, env=env, check=False,
    )  # fmt: skip


def state(root: Path) -> dict[str, Any]:
    return json.loads((root / "boot.json").read_text())


def running(root: Path) -> str:
    """What ``current/venv/bin/lepton-agent version`` prints: the image a start would run."""
    done = subprocess.run(
        [str(root / "current" / "venv" / "bin" / "lepton-agent"), "version"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    return done.stdout.strip()


def assert_bootable(root: Path) -> None:
    """After ``boot``: ``current`` runs the committed image, or the trial it points at."""
    s = state(root)
    trial = s["trial"]
    expect = trial["version"] if trial else s["committed"]["version"]
    if trial:
        assert slots.current_slot(root) == trial["slot"]
    else:
        assert slots.current_slot(root) == s["committed"]["slot"]
    assert running(root) == expect
    assert s["installing"] is None
    if s["previous"]:
        assert s["previous"]["slot"] != s["committed"]["slot"]
