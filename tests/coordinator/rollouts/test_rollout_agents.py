"""A model rollout end to end, all real: Mosquitto, the coordinator service (its leader loop
stepping the rollout), three enrolled agents from the agent package that fetch the model by
digest, deploy it and run the probe ``infer`` on their test set; driven and followed with
the ``lepton rollout`` CLI, whose exit codes say what a pipeline must do next."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from lepton.agent.config import load_config
from lepton.agent.daemon import Agent
from lepton.coordinator.cli.exitcodes import EXIT_OK, EXIT_ROLLOUT_FAILED, EXIT_ROLLOUT_WAITING
from lepton.coordinator.cli.main import main
from lepton.coordinator.model_registry.registry import ModelRegistry
from lepton.coordinator.rollouts.feature import RolloutsFeature
from lepton.coordinator.service import Coordinator
from tests.coordinator.auth.enrolling import metric
from tests.coordinator.conftest import cli_token, eventually
from tests.support.api import api_client, enrol_devices

ARTIFACTS = Path(__file__).resolve().parents[3] / "lepton" / "models" / "artifacts"
DEVICES = ("edge-a", "edge-b", "edge-c")


@contextlib.asynccontextmanager
async def agent(port: int, state: Path, device_id: str, coordinator: str) -> AsyncIterator[Agent]:
    config = load_config(
        None,
        env={},
        overrides={
            "device.id": device_id,
            "device.class": "rpi5",
            "broker.port": port,
            "broker.keepalive_s": 5,
            "broker.reconnect_min_s": 0.1,
            "broker.reconnect_max_s": 1.0,
            "agent.state_dir": state,
            "agent.capacity_interval_s": 0.5,
            "agent.capacity_min_interval_s": 0.1,
            "agent.probe": False,
            "data": {"digits-test": str(ARTIFACTS / "digits_test.npz")},
            "fetch.coordinator_url": coordinator,
        },
    )
    async with Agent(config) as a:
        runner = asyncio.create_task(a.run())
        try:
            yield a
        finally:
            a.stop()
            await asyncio.wait_for(runner, 30)


async def lepton(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def test_a_probed_model_rollout_with_an_approval_gate(
    make_coordinator: Callable[..., contextlib.AbstractAsyncContextManager[Coordinator]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with make_coordinator() as coord:
        registry = ModelRegistry(
            coord.store.engine, Path(coord.config.data_dir), create_tables=False
        )
        for precision in ("fp32", "int8"):
            registry.import_file(
                ARTIFACTS / f"digits_{precision}.onnx",
                name="digits",
                format="onnx",
                precision=precision,
            )
        assert coord.api_url is not None
        cli_token(monkeypatch, coord)
        api_url = coord.api_url
        await enrol_devices(coord, {d: tmp_path / d for d in DEVICES})
        async with contextlib.AsyncExitStack() as stack:
            for d in DEVICES:
                await stack.enter_async_context(
                    agent(coord.config.mqtt.port, tmp_path / d, d, api_url)
                )
            api = await stack.enter_async_context(api_client(coord, timeout=10))

            async def all_online() -> bool:
                devs = (await api.get("/v1/devices")).json()
                return {x["id"] for x in devs if x["state"] == "online"} >= set(DEVICES)

            await eventually(all_online, timeout=30, interval=0.2)

            # v1 everywhere first: one phase, no probe.
            code, out, err = await lepton(
                capsys,
                "--api",
                api_url,
                "rollout",
                "create",
                "--model",
                "digits@1",
                "--class",
                "rpi5",
            )
            assert code == EXIT_OK, err
            first = out.split()[0]
            code, out, err = await lepton(
                capsys,
                "--api",
                api_url,
                "rollout",
                "status",
                first,
                "--watch",
                "--interval",
                "0.2",
                "--timeout",
                "60",
                "--devices",
            )
            assert code == EXIT_OK, out + err
            assert out.count("deployed") == 3

            # v2 (INT8) with a probe: a canary of one, then an operator approves the rest.
            code, out, err = await lepton(
                capsys,
                "--api",
                api_url,
                "rollout",
                "create",
                "--model",
                "digits@2",
                "--phases",
                "canary:1,100%",
                "--approve-after",
                "1",
                "--probe-source",
                "digits-test",
                "--max-accuracy-drop",
                "0.05",
                "--max-latency-increase",
                "20",
                "--revert-on-abort",
            )
            assert code == EXIT_OK, err
            second = out.split()[0]
            watch = ("rollout", "status", second, "--watch", "--interval", "0.2", "--timeout", "90")
            code, out, err = await lepton(capsys, "--api", api_url, "--json", *watch)
            assert code == EXIT_ROLLOUT_WAITING, out + err
            assert '"succeeded": 1' in out
            code, out, err = await lepton(capsys, "--api", api_url, "rollout", "approve", second)
            assert code == EXIT_OK, err
            code, out, err = await lepton(capsys, "--api", api_url, *watch, "--devices")
            assert code == EXIT_OK, out + err
            assert out.count("probe within margins") == 3

            # An abort of a finished rollout is refused; one no model can pass aborts.
            code, _, err = await lepton(capsys, "--api", api_url, "rollout", "abort", second)
            assert code != EXIT_OK
            assert "cannot abort a completed rollout" in err
            code, out, err = await lepton(
                capsys,
                "--api",
                api_url,
                "rollout",
                "create",
                "--model",
                "digits@2",
                "--probe-source",
                "no-such-data",
                "--abort-min",
                "1",
                "--abort-failure",
                "0",
                "--max-in-flight",
                "1",
            )
            assert code == EXIT_OK, err
            third = out.split()[0]
            code, out, err = await lepton(
                capsys,
                "--api",
                api_url,
                "rollout",
                "status",
                third,
                "--watch",
                "--interval",
                "0.2",
                "--timeout",
                "90",
                "--devices",
            )
            assert code == EXIT_ROLLOUT_FAILED, out + err
            assert "aborted" in out
            assert "probe task failed" in out
            feature = coord.feature(RolloutsFeature)
            counts = feature.store.counts(third)
            assert counts["failed"] == 1
            (failed,) = feature.store.devices(third, state="failed")
            # The model that failed its probe is not left serving: v1 is deployed back.
            assert failed.reason.endswith("previous version deployed back"), failed.reason
            assert failed.task_id is not None
            undo = await eventually(
                lambda: (t := coord.store.tasks.get_task(failed.task_id or "")).terminal and t,
                timeout=30,
            )
            assert (undo.kind, undo.state, undo.output["precision"]) == (
                "deploy",
                "succeeded",
                "fp32",
            )
            assert counts["skipped"] == 2
            assert metric(coord, "lepton_rollout_requests_total", {"outcome": "created"}) == 3
            ended = "lepton_rollouts_ended_total"
            assert metric(coord, ended, {"kind": "model", "state": "completed"}) == 2
            assert metric(coord, ended, {"kind": "model", "state": "aborted"}) == 1
            settled = "lepton_rollout_devices_total"
            assert metric(coord, settled, {"kind": "model", "state": "succeeded"}) == 6
