"""The shipped systemd units and the agent's drop-ins pass systemd's own checks.

``systemd-analyze verify`` fails a unit whose ExecStart binary does not exist, and the agent
is not installed at /opt/lepton/current/venv on a test machine. Each test therefore copies the
unit to a temporary directory and changes only the ExecStart line, to a stub script that
exists; every other line (the ``lepton-slot boot`` ExecStartPre included: /usr/bin/python3
exists) is checked exactly as shipped. The update units (lepton-update.path, .service,
.timer) run /usr/bin/python3 and are verified unchanged.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "deploy/systemd/lepton-agent.service"
DROP_INS = sorted((REPO / "deploy/systemd/drop-ins").glob("*.conf"))
EXEC_START = "ExecStart=/opt/lepton/current/venv/bin/lepton-agent "
BOOT_STEP = "ExecStartPre=+/usr/bin/python3 /opt/lepton/bin/lepton-slot --root /opt/lepton boot"
UPDATE_UNITS = [
    REPO / f"deploy/systemd/lepton-update.{ext}" for ext in ("service", "path", "timer")
]
MAX_UPDATE_EXPOSURE = 2.0
MAX_EXPOSURE = 2.5

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
pytestmark = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed (no systemd on this machine)"
)


def _install(tmp_path: Path, drop_in: Path | None = None) -> Path:
    stub = tmp_path / "lepton-agent"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    text = UNIT.read_text()
    assert text.count(EXEC_START) == 1, "the unit must have exactly one ExecStart line"
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace(EXEC_START, f"ExecStart={stub} "))
    if drop_in is not None:
        conf_dir = tmp_path / f"{UNIT.name}.d"
        conf_dir.mkdir()
        shutil.copy(drop_in, conf_dir / drop_in.name)
    return unit


def _analyze(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [SYSTEMD_ANALYZE, *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=cwd,
        check=False,
    )


def _exposure(unit: Path) -> float:
    done = _analyze("security", "--offline=yes", str(unit), cwd=unit.parent)
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", done.stdout)
    assert match, f"no exposure line in:\n{done.stdout}\n{done.stderr}"
    return float(match.group(1))


def test_unit_verifies_cleanly(tmp_path: Path) -> None:
    unit = _install(tmp_path)
    done = _analyze("verify", str(unit), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (done.stdout + done.stderr).strip() == "", done.stdout + done.stderr


def test_unit_exposure(tmp_path: Path) -> None:
    exposure = _exposure(_install(tmp_path))
    assert exposure <= MAX_EXPOSURE, f"exposure {exposure} > {MAX_EXPOSURE}"


def test_unit_essentials() -> None:
    lines = {ln.strip() for ln in UNIT.read_text().splitlines() if ln and not ln.startswith("#")}
    for expected in (
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=30",
        "Restart=on-failure",
        "StateDirectory=lepton",
        "ConfigurationDirectory=lepton",
        "DynamicUser=yes",
        "MemoryDenyWriteExecute=yes",
        BOOT_STEP,
    ):
        assert expected in lines, expected
    assert any(ln.endswith("run --config /etc/lepton/agent.toml") for ln in lines)


@pytest.mark.parametrize("drop_in", DROP_INS, ids=[p.name for p in DROP_INS])
def test_drop_ins_verify(tmp_path: Path, drop_in: Path) -> None:
    unit = _install(tmp_path, drop_in)
    done = _analyze("verify", str(unit), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (done.stdout + done.stderr).strip() == "", done.stdout + done.stderr
    assert _exposure(unit) <= MAX_EXPOSURE


def test_update_units_verify(tmp_path: Path) -> None:
    for unit in UPDATE_UNITS:
        shutil.copy(unit, tmp_path / unit.name)
    done = _analyze("verify", *(u.name for u in UPDATE_UNITS), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (done.stdout + done.stderr).strip() == "", done.stdout + done.stderr
    exposure = _exposure(tmp_path / "lepton-update.service")
    assert exposure <= MAX_UPDATE_EXPOSURE, f"exposure {exposure} > {MAX_UPDATE_EXPOSURE}"


def test_update_units_essentials() -> None:
    service = (REPO / "deploy/systemd/lepton-update.service").read_text()
    assert "Type=oneshot" in service
    assert "lepton-slot --root /opt/lepton service --state-dir /var/lib/lepton" in service
    assert "PrivateNetwork=yes" in service  # images install offline, from their own wheels
    path = (REPO / "deploy/systemd/lepton-update.path").read_text()
    for name in ("request.json", "health.json"):
        assert f"PathChanged=/var/lib/lepton/update/{name}" in path
    timer = (REPO / "deploy/systemd/lepton-update.timer").read_text()
    assert "OnUnitActiveSec=30s" in timer
