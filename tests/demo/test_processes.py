"""The demo's processes: started in their own groups, and none left behind when the stack
closes, when the demo gets SIGTERM, or when the demo itself is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from lepton.demo.broker import EmbeddedBroker, mosquitto_binary
from lepton.demo.procs import pid_alive
from lepton.demo.stack import NOT_ISOLATED, Stack, StackSpec
from tests.demo import security

REPO = Path(__file__).resolve().parents[2]


def wait_for(check: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def online(stack: Stack) -> int:
    try:
        devices = httpx.get(
            f"{stack.api_url}/v1/devices", headers=stack.headers, timeout=2, verify=stack.verify
        ).json()
    except httpx.HTTPError:
        return 0
    return sum(d["state"] == "online" and d["capacity"] is not None for d in devices)


@pytest.mark.parametrize("broker", ["mosquitto", "embedded"])
def test_stack_runs_and_close_stops_every_process(tmp_path: Path, broker: str) -> None:
    if broker == "mosquitto" and mosquitto_binary() is None:
        pytest.fail("mosquitto binary not found; scripts/test installs it")
    stack = Stack(StackSpec(workdir=tmp_path, devices=3, broker=broker, host_gflops=20.0))  # type: ignore[arg-type]
    with stack:
        described = stack.start_broker()
        assert broker in described.split()[0] or broker == "embedded"
        # Without accounts on the broker the demo says so where it says what runs.
        assert (NOT_ISOLATED in described) == (broker == "embedded")
        health = stack.start_coordinator()
        assert health["mqtt_connected"]
        assert stack.api_url.startswith("https://")
        assert security.plain_http_fails(stack.api_url)
        stack.start_fleet()
        wait_for(lambda: online(stack) == 3, 60, "3 devices online")
        # Every device enrolled (its own device token), on either broker; MQTT TLS and
        # broker accounts only on Mosquitto.
        enrolled = security.enrolled(tmp_path)
        assert len(enrolled) == 3
        idents = security.identities(tmp_path)
        assert set(idents) == set(enrolled)
        assert {i["mqtt"]["tls"] for i in idents.values()} == {broker == "mosquitto"}
        if broker == "mosquitto":
            assert security.broker_usernames(tmp_path) == set(enrolled) | {"coordinator"}
            assert all(
                "certfile" in x["options"] for x in security.listeners(stack.trust.broker_conf)
            )  # type: ignore[union-attr, arg-type]
        pids = stack.pids()
        assert set(pids) == {"broker", "coordinator", "fleet"}
        assert all(pid_alive(p) for p in pids.values())
        # Each child leads its own process group, apart from this one.
        assert all(os.getpgid(p) == p for p in pids.values())
        recorded = json.loads((tmp_path / "pids.json").read_text())
        assert {k: recorded[k] for k in pids} == pids
    assert not [name for name, pid in pids.items() if pid_alive(pid)]


def test_embedded_broker_stops_on_sigterm(tmp_path: Path) -> None:
    broker = EmbeddedBroker(workdir=tmp_path)
    broker.start()
    pid = broker.pid
    assert pid is not None
    broker.stop()
    assert not pid_alive(pid)


def _terminal_signals() -> None:
    """In the child: Ctrl-C acts as in a terminal, even when this run was started in the
    background of a script (which starts it with SIGINT ignored, inherited by children)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_demo(workdir: Path, *extra: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin"}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lepton.demo",
            "--quick",
            "--devices",
            "2",
            "--workdir",
            str(workdir),
            *extra,
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=_terminal_signals,  # noqa: PLW1509 - a signal disposition, before exec
    )


def children_started(workdir: Path) -> dict[str, int] | None:
    try:
        pids = json.loads((workdir / "pids.json").read_text())
    except (OSError, ValueError):
        return None
    return pids if {"broker", "coordinator", "fleet"} <= pids.keys() else None


@pytest.mark.timeout(180)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_signal_to_the_demo_stops_everything(tmp_path: Path, sig: signal.Signals) -> None:
    workdir = tmp_path / "demo"
    demo = start_demo(workdir)
    try:
        pids = wait_for(lambda: children_started(workdir), 90, "the demo's processes")
        assert isinstance(pids, dict)
        demo.send_signal(sig)
        out, _ = demo.communicate(timeout=90)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert demo.returncode == 130, out.decode(errors="replace")[-2000:]
    assert b"Stopping fleet, coordinator and broker" in out
    left = {name: pid for name, pid in pids.items() if name != "demo" and pid_alive(pid)}
    assert not left, f"still running after SIGTERM: {left}"


@pytest.mark.timeout(180)
def test_children_die_with_a_killed_demo(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    demo = start_demo(workdir)
    try:
        pids = wait_for(lambda: children_started(workdir), 90, "the demo's processes")
        assert isinstance(pids, dict)
        demo.kill()  # SIGKILL: no handler runs, only the kernel's parent-death signal
        demo.wait()
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        if demo.stdout is not None:
            demo.stdout.close()
    children = {name: pid for name, pid in pids.items() if name != "demo"}
    wait_for(lambda: not any(pid_alive(p) for p in children.values()), 60, "children to exit")
