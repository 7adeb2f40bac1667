"""``lepton-demo`` is its own command: the production ``lepton`` CLI has no ``demo``."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from lepton.coordinator.cli import build_parser as lepton_parser
from lepton.demo.cli import build_parser, main

REPO = Path(__file__).resolve().parents[2]


def test_the_demo_has_its_own_console_script() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["lepton-demo"] == "lepton.demo.cli:main"
    assert scripts["lepton"] == "lepton.coordinator.cli:main"


def test_the_production_cli_has_no_demo_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        lepton_parser().parse_args(["demo", "--quick"])
    assert exc.value.code == 2
    assert "invalid choice: 'demo'" in capsys.readouterr().err


def test_demo_options() -> None:
    args = build_parser().parse_args(["--quick", "--devices", "3", "--broker", "embedded"])
    assert (args.quick, args.devices, args.rounds, args.broker) == (True, 3, None, "embedded")
    assert args.workdir == Path("lepton-demo")


def test_a_fleet_too_small_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--devices", "1", "--workdir", str(tmp_path / "w")]) == 2
    assert "--devices must be >= 2" in capsys.readouterr().err


def test_python_m_lepton_demo_is_the_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "lepton.demo", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: lepton-demo")
