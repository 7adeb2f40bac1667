from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import lepton.agent.telemetry.measure as measure_mod
import lepton.agent.telemetry.probe as probe_mod
from lepton.agent.telemetry.board import device_accelerators
from lepton.agent.telemetry.measure import available_runtimes, provider_label, run_probe
from lepton.agent.telemetry.probe import CACHE_FILE, ProbeResult, cache_key, load_probe

pytestmark = pytest.mark.skipif(
    not Path("/proc/sys/kernel/random/boot_id").exists(),
    reason="the probe cache is keyed by the Linux boot id",
)

CANNED: dict[str, Any] = {
    "bench": {"fp32_gflops": 1.5, "int8_gops": 3.0, "runtime": "fake", "measured_at": 1.0},
    "runtimes": ["onnxruntime"],
    "accelerators": ["cpu"],
    "details": {"errors": []},
}


@pytest.fixture
def fake_subprocess(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Replace the probe subprocess with a canned answer; records each call's time limit."""
    calls: list[float] = []

    async def run(limit_s: float, budget_s: float) -> dict[str, Any]:
        calls.append(limit_s)
        return json.loads(json.dumps(CANNED))

    monkeypatch.setattr(probe_mod, "_run_subprocess", run)
    return calls


async def test_real_probe_measures_and_is_cached(tmp_path: Path) -> None:
    started = time.monotonic()
    first = await load_probe(tmp_path, agent_version="1.2.3")
    wall = time.monotonic() - started
    assert first.ok, first.error
    assert not first.from_cache
    assert first.bench is not None
    assert first.bench.fp32_gflops > 0
    assert first.bench.int8_gops is not None
    assert first.bench.int8_gops > 0
    assert first.bench.runtime.startswith("onnxruntime ")
    assert "onnxruntime" in first.runtimes
    assert "cpu" in first.accelerators
    assert first.details["fp32"]["iterations"] >= 1
    assert first.details["int8"]["iterations"] >= 1
    assert first.details["errors"] == []
    assert wall < 30, f"probe took {wall:.1f} s"

    cached = json.loads((tmp_path / CACHE_FILE).read_text())
    assert cached["key"] == cache_key("1.2.3")

    again = await load_probe(tmp_path, agent_version="1.2.3")
    assert again.from_cache
    assert again.bench == first.bench
    assert again.runtimes == first.runtimes
    assert again.accelerators == first.accelerators


async def test_cache_reused_only_for_same_key(tmp_path: Path, fake_subprocess: list[float]) -> None:
    first = await load_probe(tmp_path, agent_version="1.0")
    assert len(fake_subprocess) == 1
    assert first.bench is not None
    assert (await load_probe(tmp_path, agent_version="1.0")).from_cache
    assert len(fake_subprocess) == 1
    # A new agent version re-measures; so does refresh=True.
    assert not (await load_probe(tmp_path, agent_version="1.1")).from_cache
    assert len(fake_subprocess) == 2
    assert not (await load_probe(tmp_path, agent_version="1.1", refresh=True)).from_cache
    assert len(fake_subprocess) == 3


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{not json",
        b"[]",
        b'{"key": null}',
        # Right key, invalid figures (negative throughput).
        b"KEY_WITH_BAD_RESULT",
    ],
)
async def test_broken_cache_is_ignored(
    tmp_path: Path,
    fake_subprocess: list[float],
    content: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    if content == b"KEY_WITH_BAD_RESULT":
        bad = {**CANNED, "bench": {"fp32_gflops": -1.0}}
        content = json.dumps({"key": cache_key("1.0"), "result": bad}).encode()
    (tmp_path / CACHE_FILE).write_bytes(content)
    with caplog.at_level(logging.INFO, logger="lepton.agent.telemetry.probe"):
        result = await load_probe(tmp_path, agent_version="1.0")
    assert not result.from_cache
    assert result.bench is not None
    assert result.bench.fp32_gflops == 1.5
    assert len(fake_subprocess) == 1
    # The broken file was replaced by a good one.
    assert json.loads((tmp_path / CACHE_FILE).read_text())["key"] == cache_key("1.0")


def _stub_python(tmp_path: Path, body: str) -> str:
    stub = tmp_path / "stub-python"
    stub.write_text(f"#!/bin/sh\n{body}\n")
    stub.chmod(0o755)
    return str(stub)


@pytest.mark.parametrize(
    ("body", "timeout", "expect"),
    [
        ("echo boom >&2; exit 3", 10.0, "exited with status 3: boom"),
        ("echo 'not json'", 10.0, "printed no JSON"),
        ("true", 10.0, "printed nothing"),
        ('echo \'{"bench": {"fp32_gflops": "fast"}}\'', 10.0, "invalid"),
        ("exec sleep 30", 0.5, "did not finish within 0.5 s"),
    ],
)
async def test_failing_probe_does_not_raise(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    body: str,
    timeout: float,
    expect: str,
) -> None:
    monkeypatch.setattr(probe_mod.sys, "executable", _stub_python(tmp_path, body))
    state = tmp_path / "state"
    with caplog.at_level(logging.ERROR, logger="lepton.agent.telemetry.probe"):
        result = await load_probe(state, agent_version="1.0", timeout=timeout)
    assert isinstance(result, ProbeResult)
    assert result.bench is None
    assert not result.ok
    assert result.error is not None
    assert expect in result.error
    assert result.details["error"] == result.error
    assert result.runtimes == ()
    assert result.accelerators  # at least "cpu"
    assert expect in caplog.text
    assert not (state / CACHE_FILE).exists(), "a failure must not be cached"


async def test_missing_interpreter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probe_mod.sys, "executable", str(tmp_path / "no-such-python"))
    result = await load_probe(tmp_path, agent_version="1.0")
    assert result.error is not None
    assert "could not start" in result.error


async def test_timeout_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="timeout"):
        await load_probe(tmp_path, agent_version="1.0", timeout=0)


def test_child_environment_drops_systemd_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("WATCHDOG_USEC", "1")
    env = probe_mod._child_env()
    assert "NOTIFY_SOCKET" not in env
    assert "WATCHDOG_USEC" not in env
    assert env.get("PATH") == probe_mod.os.environ.get("PATH")


def test_provider_labels() -> None:
    assert provider_label("CPUExecutionProvider") == "cpu"
    assert provider_label("CUDAExecutionProvider") == "cuda"
    assert provider_label("TensorrtExecutionProvider") == "tensorrt"
    assert provider_label("AzureExecutionProvider") is None
    assert provider_label("FancyNpuExecutionProvider") == "fancynpu"


def test_runtimes_found_without_import() -> None:
    before = set(sys.modules)
    found = available_runtimes()
    assert found.get("onnxruntime") == "onnxruntime"
    assert "onnxruntime" not in set(sys.modules) - before


def test_device_accelerators_fake_tree(tmp_path: Path) -> None:
    assert device_accelerators(tmp_path) == ((), {})
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev/apex_0").touch()
    (tmp_path / "dev/hailo0").touch()
    labels, details = device_accelerators(tmp_path)
    assert labels == ("edgetpu", "hailo")
    assert details["hailo"] == ["hailo0"]


def test_coral_usb_needs_visible_usb_nodes(tmp_path: Path) -> None:
    dev = tmp_path / "sys/bus/usb/devices/1-1.2"
    dev.mkdir(parents=True)
    (dev / "idVendor").write_text("18d1\n")
    (dev / "idProduct").write_text("9302\n")
    assert device_accelerators(tmp_path)[0] == ()  # /dev/bus/usb hidden (PrivateDevices=yes)
    (tmp_path / "dev/bus/usb").mkdir(parents=True)
    labels, details = device_accelerators(tmp_path)
    assert labels == ("edgetpu",)
    assert details["edgetpu"] == "usb:18d1:9302"


def test_numpy_fallback_without_onnxruntime(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(measure_mod, "available_runtimes", dict)
    answer = run_probe(budget_s=0.05)
    assert answer["bench"]["runtime"].startswith("numpy ")
    assert answer["bench"]["fp32_gflops"] > 0
    assert answer["bench"]["int8_gops"] is None
    assert answer["runtimes"] == []
    assert answer["accelerators"] == ["cpu"]
    assert "onnxruntime: not installed" in answer["details"]["errors"]


def test_broken_onnxruntime_is_not_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(budget_s: float, details: dict[str, Any]) -> None:
        raise ImportError("illegal instruction in a wheel built for another CPU")

    monkeypatch.setattr(measure_mod, "available_runtimes", lambda: {"onnxruntime": "onnxruntime"})
    monkeypatch.setattr(measure_mod, "_bench_onnxruntime", broken)
    answer = run_probe(budget_s=0.05)
    assert answer["runtimes"] == []
    assert answer["bench"]["runtime"].startswith("numpy ")
    assert any("illegal instruction" in e for e in answer["details"]["errors"])
