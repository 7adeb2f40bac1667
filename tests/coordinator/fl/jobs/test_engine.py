"""Federated jobs end to end: a coordinator, a real Mosquitto and simulated devices that are
real agents training torch models on their own label-skewed digits partitions."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest

from lepton.coordinator.fl.store import FLStore
from lepton.coordinator.model_registry.quantize import QuantizationConfig, quantize_and_publish
from lepton.coordinator.model_registry.registry import ModelRegistry
from lepton.coordinator.service import Coordinator
from lepton.models.data import digits_splits
from tests.coordinator.fl.conftest import (
    FleetMaker,
    digits_job,
    ended,
    run_job,
    wait_for_devices,
    wait_job,
)
from tests.support.api import api_client, endpoint

MakeCoordinator = Callable[..., AbstractAsyncContextManager[Coordinator]]
#: A short job (3 rounds of 4 devices, 5 local epochs) on alpha=0.5 label skew reaches this.
CONVERGED_ACCURACY = 0.85


async def test_short_job_converges_and_registers_an_onnx_model(
    make_coordinator: MakeCoordinator, sim_fleet: FleetMaker, tmp_path: Path
) -> None:
    async with make_coordinator() as c:
        fleet = await sim_fleet(c, 4)
        assert c.api_url is not None
        await wait_for_devices(c, 4)
        async with api_client(c) as api:
            r = await api.post("/v1/fl/jobs", json=digits_job(fleet.eval_path, final_format="onnx"))
            assert r.status_code == 201, r.text
            job_id = r.json()["id"]
            job = await wait_job(c, job_id, ended, timeout=50)
            metrics = (await api.get("/metrics")).text
        assert job["state"] == "done", job
        history = job["history"]
        assert [r["round"] for r in history] == [1, 2, 3]
        assert all(r["state"] == "closed" and r["accepted"] == 4 for r in history)
        accuracies = [r["accuracy"] for r in history]
        assert accuracies[-1] >= CONVERGED_ACCURACY, accuracies
        assert accuracies[-1] > accuracies[0]
        # int8 updates: about a quarter of the FP32 weights each.
        assert all(r["bytes_up"] < 0.35 * r["bytes_down"] for r in history)
        final = job["final_model"]
        assert final["format"] == "onnx"
        assert final["accuracy"] == pytest.approx(accuracies[-1])
        registry = ModelRegistry(c.store.engine, tmp_path / "coordinator", create_tables=False)
        record = registry.get("digits")
        assert record.digest == final["digest"]
        assert record.precision == "fp32"
        assert record.inputs[0].shape[1:] == (1, 8, 8)
        # It quantizes through the accuracy gate like any registered model.
        source = tmp_path / "fl.onnx"
        source.write_bytes(registry.read_blob(record.digest))
        splits = digits_splits()
        published = await asyncio.to_thread(
            quantize_and_publish,
            registry,
            name="digits",
            source=source,
            calibration=splits.calibration.batches(32),
            evaluation=(splits.test.x, splits.test.y),
            config=QuantizationConfig(latency_runs=3),
        )
        assert published.report.passed
        assert published.int8.precision == "int8"
        assert published.int8.parent_version == published.fp32.version
        assert 'lepton_fl_rounds_total{outcome="closed"} 3.0' in metrics
        assert "lepton_fl_uploads_total 12.0" in metrics
        # Every counted update is recorded once, with the result that names it.
        fl = FLStore(c.store.engine)
        for rnd in fl.list_rounds(job_id):
            ups = fl.updates_for(job_id, rnd.round)
            assert sorted(u.device_id for u in ups) == sorted(rnd.contributors or [])
            assert all(u.complete for u in ups)


async def test_wait_for_forced_counts_the_device_the_floor_forced_in(
    make_coordinator: MakeCoordinator, sim_fleet: FleetMaker
) -> None:
    """Two fast devices and a Raspberry Pi 4; one update needed, two asked. Round 2's
    staleness floor forces the Pi in (never chosen); with ``wait_for_forced`` the round waits
    for it, so the Pi's update counts instead of the round closing on the fast device."""
    async with make_coordinator() as c:
        fleet = await sim_fleet(c, 3, mix={"x86-gateway": 2.0, "rpi4": 1.0})
        assert c.api_url is not None
        await wait_for_devices(c, 3)
        body = digits_job(
            fleet.eval_path,
            rounds=2,
            clients_per_round=1,
            min_results=1,
            over_select=1.0,
            epochs=1,
            fairness={"max_staleness": 1, "wait_for_forced": True},
        )
        job = await run_job(c, body, timeout=60)
        assert job["state"] == "done", job
        rounds = FLStore(c.store.engine).list_rounds(job["id"])
        second = rounds[1]
        forced = (second.selection or {}).get("forced")
        assert forced is not None
        assert len(forced) == 1
        assert "rpi4" in forced[0]
        assert forced[0] in (second.contributors or [])


@pytest.mark.parametrize("policy", ["drop", "fold"])
async def test_late_updates_are_lost_or_folded_into_a_later_round(
    make_coordinator: MakeCoordinator, sim_fleet: FleetMaker, policy: str
) -> None:
    """Two fast devices and a Raspberry Pi 5, all three asked, two updates needed: round 1
    closes on the fast ones while the Pi still trains. Its work is then lost (``drop``), or
    aggregated once by a later round as ``device@1``, discounted (``fold``). The host is taken
    for a 32 GFLOP/s one: the gateways work at its speed, the Pi (16) takes twice as long, so
    its update comes about two rounds late, well inside ``max_rounds``, however loaded the
    host is."""
    async with make_coordinator() as c:
        fleet = await sim_fleet(c, 3, mix={"x86-gateway": 2.0, "rpi5": 1.0}, host_gflops=32.0)
        pi = next(d for d in fleet.ids if "rpi5" in d)
        assert c.api_url is not None
        await wait_for_devices(c, 3)
        body = digits_job(
            fleet.eval_path,
            rounds=8,
            clients_per_round=2,
            min_results=2,
            over_select=0.5,
            epochs=2,
            late={"policy": policy, "max_rounds": 4},
        )
        job = await run_job(c, body, timeout=90)
        assert job["state"] == "done", job
        rounds = FLStore(c.store.engine).list_rounds(job["id"])
    first = rounds[0]
    assert sorted(first.selected) == fleet.ids
    assert pi not in (first.contributors or []), "the Pi was not late: nothing to test"
    folded = [
        (rnd.round, name)
        for rnd in rounds
        for name in (rnd.metrics or {}).get("aggregated", [])
        if "@" in name
    ]
    if policy == "drop":
        assert folded == []
        assert all("late" not in (rnd.metrics or {}) for rnd in rounds)
        return
    # The Pi's round-1 update is aggregated by exactly one later round, within max_rounds,
    # and no late update twice.
    late_pi = [at for at, name in folded if name == f"{pi}@1"]
    assert len(late_pi) == 1, folded
    assert 2 <= late_pi[0] <= 5
    assert len({name for _, name in folded}) == len(folded)
    at = next(rnd for rnd in rounds if rnd.round == late_pi[0])
    assert f"{pi}@1" in (at.contributors or [])
    assert (at.metrics or {})["late"] >= 1
    assert job["history"][at.round - 1]["late"] == (at.metrics or {})["late"]  # the API's view
    # A round still waits for updates of its own: late ones come on top.
    assert all((rnd.metrics or {})["accepted"] >= 2 for rnd in rounds)


async def test_stop_cancels_the_open_round(
    make_coordinator: MakeCoordinator, sim_fleet: FleetMaker
) -> None:
    """Slow devices (Raspberry Pi 4 profiles, 30 local epochs) keep round 1 open for many
    seconds; a stop then cancels it, and a job stopped in its first round registers no
    model (there are no aggregated weights to register)."""
    async with make_coordinator() as c:
        fleet = await sim_fleet(c, 2, mix={"rpi4": 1.0})
        assert c.api_url is not None
        await wait_for_devices(c, 2)
        body = digits_job(fleet.eval_path, clients_per_round=2, epochs=30, deadline_s=120.0)
        async with api_client(c) as api:
            r = await api.post("/v1/fl/jobs", json=body)
            assert r.status_code == 201, r.text
            job_id = r.json()["id"]
            await wait_job(
                c,
                job_id,
                lambda j: bool(j["history"]) and j["history"][-1]["state"] == "open",
                timeout=30,
            )
            assert (await api.post(f"/v1/fl/jobs/{job_id}/stop")).status_code == 200
            job = await wait_job(c, job_id, ended, timeout=20)
        assert job["state"] == "stopped"
        assert [(h["round"], h["state"]) for h in job["history"]] == [(1, "cancelled")]
        assert job["final_model"] is None


async def test_cli_start_status_stop(
    make_coordinator: MakeCoordinator, sim_fleet: FleetMaker, tmp_path: Path
) -> None:
    async with make_coordinator() as c:
        fleet = await sim_fleet(c, 3)
        assert c.api_url is not None
        await wait_for_devices(c, 3)
        job_file = tmp_path / "job.toml"
        job_file.write_text(
            "\n".join(
                [
                    'name = "digits-cli"',
                    'model = "lepton.models.digits:DigitsCNN"',
                    'data = "digits"',
                    "rounds = 50",
                    "clients_per_round = 3",
                    "epochs = 1",
                    f'eval = "{fleet.eval_path}"',
                    'final_format = "torch"',
                    # A few noisy DP rounds may score below the start; registration is what
                    # this test follows (the check has tests of its own).
                    "final_check = false",
                    "[strategy]",
                    'name = "fedavgm"',
                    "momentum = 0.5",
                    "[dp]",
                    "noise_multiplier = 0.3",
                    "clip_norm = 5.0",
                ]
            )
        )
        bad = tmp_path / "bad.toml"
        bad.write_text(job_file.read_text().replace("epochs", "epochz"))
        code, out, err = await lepton(c, "fl", "start", str(bad))
        assert code == 2
        assert "epochz" in err
        code, out, err = await lepton(c, "fl", "start", str(job_file))
        assert code == 0, err
        job_id = out.strip()
        await wait_job(c, job_id, lambda j: j["round"] >= 3, timeout=40)
        code, out, _ = await lepton(c, "fl", "status")
        assert code == 0
        assert job_id in out
        code, out, _ = await lepton(c, "--json", "fl", "status", job_id)
        assert json.loads(out)["state"] == "running"
        code, out, _ = await lepton(c, "fl", "stop", job_id)
        assert code == 0
        assert "stopping" in out or "stopped" in out
        job = await wait_job(c, job_id, ended, timeout=20)
        assert job["state"] == "stopped"
        assert job["final_model"]["name"] == "digits-cli"
        # The open round is cancelled; a stop landing between two rounds finds none open.
        assert job["history"][-1]["state"] in ("cancelled", "closed")
        assert all(r["state"] != "open" for r in job["history"])
        # Central DP: every closed round reports the privacy spent so far, growing.
        spent = [r["metrics"]["dp.epsilon"] for r in job["history"] if r["state"] == "closed"]
        assert len(spent) >= 3
        assert spent == sorted(spent)
        assert spent[0] > 0
        code, out, _ = await lepton(c, "fl", "status", job_id, "--watch")
        assert code == 0
        assert "stopped" in out
        assert "ROUND" in out
        code, _, err = await lepton(c, "fl", "status", "nope-00000000")
        assert code == 3


async def lepton(c: Coordinator, *args: str) -> tuple[int, str, str]:
    """``lepton --api URL ARGS`` as a process, with an operator token in ``$LEPTON_TOKEN``."""
    ep = endpoint(c)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "lepton.coordinator.cli",
        "--api",
        ep.url,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin", "LEPTON_TOKEN": ep.token},
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_job_spec_errors_name_the_key(make_coordinator: MakeCoordinator) -> None:
    async with make_coordinator() as c, api_client(c) as api:
        body: dict[str, Any] = digits_job(Path("x.npz"), lr=-1)
        r = await api.post("/v1/fl/jobs", json=body)
        assert r.status_code == 422
        assert r.json()["detail"][0]["loc"] == ["body", "lr"]
        body = digits_job(Path("x.npz"), strategy={"name": "krum", "nope": 1})
        r = await api.post("/v1/fl/jobs", json=body)
        assert r.status_code == 422
        assert "nope" in r.text
        r = await api.get("/v1/fl/jobs/unknown-1")
        assert r.status_code == 404
