"""``scripts/release``: the commands it runs and the exit codes a pipeline gets, with a stand-in
for ``lepton`` that records each call and answers as told (the real commands have their own
tests: tests/coordinator/rollouts, tests/coordinator/releases)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "release"

STUB = """
import json, os, sys, time
args = sys.argv[1:]
with open(os.environ["STUB_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
key = " ".join(args[:2])
codes = json.loads(os.environ.get("STUB_CODES", "{}"))
if key == "release build":
    print(json.dumps({"bundle": "/out/lepton-agent-1.4.0-rpi.bundle.tar"}))
elif key == "rollout create":
    print(json.dumps({"id": "ro-123", "state": "running"}))
elif key == "rollout status" and "STUB_SLEEP" in os.environ:
    time.sleep(float(os.environ["STUB_SLEEP"]))
sys.exit(codes.get(key, 0))
"""


def run(
    tmp_path: Path, *args: str, codes: dict[str, int] | None = None, sleep: float | None = None
) -> tuple[int, str, list[list[str]]]:
    stub = tmp_path / "lepton_stub.py"
    stub.write_text(STUB)
    log = tmp_path / "calls.jsonl"
    log.write_text("")
    env = {
        **os.environ,
        "LEPTON_CLI": f"{sys.executable} {stub}",
        "STUB_LOG": str(log),
        "STUB_CODES": json.dumps(codes or {}),
    }
    if sleep is not None:
        env["STUB_SLEEP"] = str(sleep)
    done = subprocess.run(
        ["bash", str(SCRIPT), *args],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    return done.returncode, done.stdout, calls


def test_build_stage_promote_and_abort_run_the_lepton_commands(tmp_path: Path) -> None:
    rc, out, calls = run(
        tmp_path, "build", "firmware_images/rpi.toml", "1.4.0", "--wheelhouse", "w", "--key", "k"
    )
    assert (rc, out.strip()) == (0, "/out/lepton-agent-1.4.0-rpi.bundle.tar")
    assert calls == [
        [
            *("release", "build", "firmware_images/rpi.toml", "--version", "1.4.0", "--json"),
            *("--wheelhouse", "w", "--key", "k"),
        ]
    ]
    rc, out, calls = run(tmp_path, "stage", "lepton-agent", "1.4.0", "--phases", "canary:10,100%")
    assert (rc, out.strip()) == (0, "ro-123")
    assert calls == [
        [
            *("rollout", "create", "--release", "lepton-agent@1.4.0", "--json"),
            *("--phases", "canary:10,100%"),
        ]
    ]
    assert run(tmp_path, "promote", "ro-123")[2] == [["rollout", "approve", "ro-123"]]
    assert run(tmp_path, "abort", "ro-123", "--revert")[2] == [
        ["rollout", "abort", "ro-123", "--revert"]
    ]
    assert run(tmp_path, "publish", "b.tar")[2] == [["release", "publish", "b.tar"]]


@pytest.mark.parametrize(
    ("lepton", "script"),
    [(0, 0), (10, 10), (11, 11), (3, 3), (4, 4), (9, 9), (1, 1), (7, 1)],
)
def test_watch_turns_the_rollout_outcome_into_the_pipeline_exit_code(
    tmp_path: Path, lepton: int, script: int
) -> None:
    rc, _, calls = run(tmp_path, "watch", "ro-123", codes={"rollout status": lepton})
    assert rc == script
    assert calls == [["rollout", "status", "ro-123", "--watch"]]


def test_watch_gives_up_after_its_timeout(tmp_path: Path) -> None:
    rc, _, _ = run(tmp_path, "watch", "ro-123", "--timeout", "1", sleep=20)
    assert rc == 124


def test_a_refused_step_stops_the_pipeline_with_its_code(tmp_path: Path) -> None:
    rc, _, calls = run(
        tmp_path,
        *("ship", "def.toml", "1.4.0", "--wheelhouse", "w", "--key", "k", "--name", "lepton-agent"),
        codes={"release publish": 4},
    )
    assert rc == 4
    assert [c[:2] for c in calls] == [["release", "build"], ["release", "publish"]]


def test_ship_runs_every_step_and_stops_at_an_approval_gate(tmp_path: Path) -> None:
    rc, out, calls = run(
        tmp_path,
        *("ship", "def.toml", "1.4.0", "--wheelhouse", "w", "--key", "k", "--name", "lepton-agent"),
        *("--", "--phases", "canary:10,50%+approve,100%"),
        codes={"rollout status": 11},
    )
    assert rc == 11
    assert out.strip() == "ro-123"
    assert [c[:2] for c in calls] == [
        ["release", "build"],
        ["release", "publish"],
        ["rollout", "create"],
        ["rollout", "status"],
    ]
    assert calls[1] == ["release", "publish", "/out/lepton-agent-1.4.0-rpi.bundle.tar"]
    assert calls[2][-2:] == ["--phases", "canary:10,50%+approve,100%"]


@pytest.mark.parametrize(
    "args", [(), ("nonsense",), ("watch",), ("abort", "ro-1", "--please"), ("stage", "x")]
)
def test_bad_arguments_are_a_usage_error(tmp_path: Path, args: tuple[str, ...]) -> None:
    rc, _, calls = run(tmp_path, *args)
    assert rc == 2
    assert calls == []
