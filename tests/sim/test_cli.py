"""``lepton-sim`` is its own command: the device agent's CLI has no ``sim``."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from lepton.agent.cli import build_parser as agent_parser
from lepton.sim.cli import build_parser, main
from tests.support.broker import Broker
from tests.support.enrolserver import FakeEnrolment
from tests.support.httpserver import HttpServer

REPO = Path(__file__).resolve().parents[2]


def test_the_simulator_has_its_own_console_script() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["lepton-sim"] == "lepton.sim.cli:main"
    assert scripts["lepton-agent"] == "lepton.agent.cli:main"


def test_the_agent_cli_has_no_sim_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        agent_parser().parse_args(["sim", "--state-root", "/tmp/x"])
    assert exc.value.code == 2
    assert "invalid choice: 'sim'" in capsys.readouterr().err


def test_sim_options(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        ["--devices", "4", "--state-root", str(tmp_path), "--first-index", "8", "--data", "digits"]
    )
    assert (args.devices, args.first_index, args.data, args.id_prefix) == (4, 8, "digits", "sim")
    assert args.state_root == tmp_path


def test_a_bad_profile_mix_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--state-root", str(tmp_path), "--profile-mix", "toaster=1", "--host-gflops", "10"]
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("lepton-sim: ")


def test_python_m_lepton_sim_is_the_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "lepton.sim", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: lepton-sim")


def test_enrol_flags_go_together(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--state-root", str(tmp_path), "--enroll", "http://127.0.0.1:1"])
    assert exc.value.code == 2
    assert "--enroll and --claim go together" in capsys.readouterr().err


def test_the_simulator_enrols_once_then_keeps_its_identities(
    broker: Broker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with HttpServer() as server:
        fake = FakeEnrolment(server.base_url, broker_port=broker.port)
        server.post_handler = fake
        claim = fake.claim(uses=3)
        argv = ["--state-root", str(tmp_path), "--devices", "3", "--host-gflops", "10"]
        argv += ["--duration", "0.5", "--enroll", server.base_url, "--claim", claim]
        assert main(argv) == 0, capsys.readouterr().err
        assert len(fake.enrolled) == 3
        assert len(list(tmp_path.glob("*/identity.json"))) == 3
        # The claim is spent; a restart needs none, as every device has its identity.
        assert main(argv) == 0, capsys.readouterr().err
        other = [*argv[:-1], fake.claim()]
        (tmp_path / next(iter(fake.enrolled)) / "identity.json").unlink()
        fake.enrolled.clear()
        assert main(other) == 0, capsys.readouterr().err
        assert len(fake.enrolled) == 1  # only the device that lost its identity enrolled
