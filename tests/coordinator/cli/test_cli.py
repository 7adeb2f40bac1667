"""The ``lepton`` CLI against a running coordinator, in-process and as real processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from lepton.coordinator.cli import main
from lepton.coordinator.cli.main import parse_param
from lepton.coordinator.service import Coordinator
from tests.coordinator.conftest import api_client, cli_token, eventually
from tests.support.broker import Broker, free_port
from tests.support.device import FakeDevice

REPO = Path(__file__).resolve().parents[3]
LEPTON = [sys.executable, "-m", "lepton.coordinator.cli"]


async def lepton(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run the CLI in a worker thread (it blocks; the coordinator shares our event loop)."""
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def test_devices_and_tasks_commands(
    coordinator: Coordinator,
    broker: Broker,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cli_token(monkeypatch, coordinator)
    api = coordinator.api_url or ""
    async with FakeDevice(broker.port, "pi-7", interval_s=0.2):
        await eventually(lambda: coordinator.store.devices.device_exists("pi-7"))
        await eventually(lambda: coordinator.store.devices.get_device("pi-7").report is not None)
        code, out, _ = await lepton(capsys, "--api", api, "devices", "ls")
        assert code == 0
        assert "pi-7" in out
        assert "online" in out
        code, out, _ = await lepton(capsys, "devices", "ls", "--json", "--api", api)
        assert [d["id"] for d in json.loads(out)] == ["pi-7"]
        code, out, _ = await lepton(capsys, "--api", api, "devices", "show", "pi-7")
        assert code == 0
        assert "sim-1" in out
        code, out, _ = await lepton(
            capsys,
            "--api",
            api,
            "--json",
            "tasks",
            "submit",
            "echo",
            "-p",
            "payload=[1,2]",
            "-p",
            "note=hello",
            "--demand",
            "2",
            "--wait",
        )
        assert code == 0
        task = json.loads(out)
        assert task["state"] == "succeeded"
        assert task["params"] == {"payload": [1, 2], "note": "hello"}
        assert task["output"] == {"echo": [1, 2]}
        code, out, _ = await lepton(capsys, "--api", api, "tasks", "ls")
        assert task["id"] in out
        assert "succeeded" in out
        code, out, _ = await lepton(capsys, "--api", api, "tasks", "show", task["id"])
        assert "pi-7" in out
        assert "attempts" in out
        code, out, _ = await lepton(capsys, "--api", api, "tasks", "explain", task["id"])
        assert code == 0
        assert "pi-7" in out
        assert "COMPUTE" in out
        code, out, _ = await lepton(capsys, "--api", api, "tasks", "submit", "echo")
        assert code == 0
        assert out.strip()


async def test_errors_and_exit_codes(
    coordinator: Coordinator, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cli_token(monkeypatch, coordinator)
    api = coordinator.api_url or ""
    code, _, err = await lepton(capsys, "--api", api, "devices", "show", "ghost")
    assert code == 3
    assert "not found" in err
    code, _, err = await lepton(
        capsys, "--api", api, "tasks", "submit", "echo", "--max-attempts", "0"
    )
    assert code == 1
    assert "max_attempts" in err
    code, _, err = await lepton(capsys, "--api", f"http://127.0.0.1:{free_port()}", "devices", "ls")
    assert code == 4
    assert "cannot reach" in err
    code, _, err = await lepton(capsys, "--api", api, "tasks", "submit", "echo", "-p", "novalue")
    assert code == 2
    code, _, err = await lepton(
        capsys,
        "--api",
        api,
        "tasks",
        "submit",
        "echo",
        "--expires-in",
        "0.2",
        "--wait",
        "--wait-timeout",
        "10",
    )
    assert code == 5  # no device: it expired


async def test_models_deploy_through_the_running_coordinator(
    coordinator: Coordinator,
    broker: Broker,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``lepton models deploy``: the coordinator sends each chosen device a deploy task whose
    URL serves the registered artifact; the other devices get nothing."""
    from lepton.coordinator.model_registry.registry import ModelRegistry

    cli_token(monkeypatch, coordinator)
    api = coordinator.api_url or ""
    registry = ModelRegistry(coordinator.store.engine, Path(coordinator.config.data_dir))
    artifact = REPO / "lepton" / "models" / "artifacts" / "digits_fp32.onnx"
    record = registry.import_file(artifact, name="digits", format="onnx", precision="fp32")
    five = FakeDevice(broker.port, "pi-5", interval_s=0.2, device_class="rpi5")
    four = FakeDevice(broker.port, "pi-4", interval_s=0.2, device_class="rpi4")
    async with five, four:
        for device in ("pi-5", "pi-4"):
            await eventually(lambda d=device: coordinator.store.devices.device_exists(d))
            await eventually(
                lambda d=device: coordinator.store.devices.get_device(d).report is not None
            )
        code, out, err = await lepton(
            capsys, "--api", api, "--json", "models", "deploy", "digits:1", "--class", "rpi5"
        )
        assert code == 0, err
        done = json.loads(out)
        assert done["model"]["digest"] == record.digest
        assert [t["pinned_device"] for t in done["tasks"]] == ["pi-5"]
        await five.wait_until(lambda: any(t.kind == "deploy" for t in five.tasks))
        task = next(t for t in five.tasks if t.kind == "deploy")
        assert task.task_id == done["tasks"][0]["id"]
        assert (task.params["digest"], task.params["size"]) == (record.digest, record.size)
        async with api_client(coordinator, ["fleet:read"]) as http:
            blob = (await http.get(task.params["url"])).content
        assert blob == artifact.read_bytes()
        await eventually(
            lambda: coordinator.store.tasks.get_task(task.task_id).state == "succeeded"
        )
        assert not [t for t in four.tasks if t.kind == "deploy"]
        code, out, _ = await lepton(capsys, "--api", api, "models", "deploy", "digits")
        assert code == 0
        assert out.startswith("digits v1 onnx/fp32")
        assert {ln.split()[1] for ln in out.splitlines()[1:]} == {"pi-4", "pi-5"}
    for argv, want in (
        (("digits:9",), 3),  # no such version
        (("ghost",), 3),
        (("digits", "--device", "nope"), 3),
        (("digits", "--class", "toaster", "--device", "pi-5"), 1),  # matches no device
        (("digits:x",), 2),
    ):
        code, _, err = await lepton(capsys, "--api", api, "models", "deploy", *argv)
        assert code == want, (argv, err)
        assert err.startswith("error: ")


def test_parse_param() -> None:
    assert parse_param("a=1") == ("a", 1)
    assert parse_param("a=x") == ("a", "x")
    assert parse_param('a={"b": true}') == ("a", {"b": True})
    assert parse_param("a=") == ("a", "")


def test_config_command_prints_effective_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(
            [
                "coordinator",
                "config",
                "--mqtt-port",
                "1999",
                "--set",
                "mqtt.password=x",
                "--data-dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["mqtt"]["port"] == 1999
    assert cfg["mqtt"]["password"] == "***"
    assert cfg["database_url"].startswith("sqlite:///")
    assert main(["coordinator", "config", "--set", "mqtt.nope=1"]) == 2
    assert "mqtt.nope" in capsys.readouterr().err


def test_one_command_start_and_sigterm(broker: Broker, tmp_path: Path) -> None:
    """`lepton coordinator run` as an operator starts it; SIGTERM drains and exits 0."""
    port = free_port()
    env = {
        **os.environ,
        "LEPTON_MQTT_PORT": str(broker.port),
        "PYTHONPATH": str(REPO),
        "XDG_CONFIG_HOME": str(tmp_path / "xdg"),
    }
    env.pop("LEPTON_TOKEN", None)
    proc = subprocess.Popen(
        [
            *LEPTON,
            "coordinator",
            "run",
            "--data-dir",
            str(tmp_path / "data"),
            "--http-port",
            str(port),
            "--instance-id",
            "cli-test",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=1).json()
                if health["mqtt_connected"] and health["leader"]:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert time.monotonic() < deadline, "coordinator did not become healthy"
            time.sleep(0.1)
        # The operator's first token, made on the host and saved where the CLI looks.
        subprocess.run(
            [*LEPTON, "tokens", "create", "me", "--data-dir", str(tmp_path / "data"), "--save"],
            env=env,
            capture_output=True,
            timeout=60,
            check=True,
        )
        out = subprocess.run(
            [*LEPTON, "--api", f"http://127.0.0.1:{port}", "--json", "tasks", "submit", "echo"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert json.loads(out.stdout)["state"] == "pending"
        assert (tmp_path / "data" / "coordinator.db").exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        log = proc.stdout.read().decode() if proc.stdout else ""
        assert "draining" in log
        assert "stopped" in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()


def test_unreachable_database_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "coordinator",
            "run",
            "--http-port",
            "0",
            "--database-url",
            f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/x",
        ]
    )
    assert code == 1
    assert "database" in capsys.readouterr().err
