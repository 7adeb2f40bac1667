"""``lepton-demo --quick`` end to end, as a newcomer runs it: the figures it reports are
checked against what the coordinator recorded, the HTML report holds its plots, and every
process is gone after Ctrl-C (SIGTERM here)."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx
import pytest

from lepton.common.tls import client_context
from lepton.demo.procs import pid_alive
from tests.demo import security

REPO = Path(__file__).resolve().parents[2]
DEVICES, ROUNDS = 8, 2  # what --quick runs


class Output:
    """The demo's output, read as it comes (so a full pipe never blocks it)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            self.lines.append(raw.decode(errors="replace"))

    @property
    def text(self) -> str:
        return "".join(self.lines)


def pooled(outputs: list[dict[str, Any]]) -> float | None:
    labelled = [o for o in outputs if o.get("labelled")]
    total = sum(o["count"] for o in labelled)
    return sum(o["correct"] for o in labelled) / total if total else None


def check_inference(api: httpx.Client, figures: dict[str, Any]) -> None:
    classes = {d["id"]: d["device_class"] for d in api.get("/v1/devices").json()}
    recorded = {
        t["id"]: t for t in api.get("/v1/tasks", params={"kind": "infer", "limit": 10000}).json()
    }
    # The second wave runs when federated rounds improved on the deployed model.
    assert len(figures["inference"]) == (2 if figures["redeploy"]["done"] else 1)
    for wave in figures["inference"]:
        tasks = [recorded[i] for i in wave["task_ids"]]
        assert wave["tasks"] == len(tasks) == DEVICES
        assert wave["succeeded"] == sum(t["state"] == "succeeded" for t in tasks)
        by_class: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for t in tasks:
            assert t["pinned_device"] is None, "inference tasks are placed, not pinned"
            by_class[classes[t["device_id"]]].append(t)
        assert set(wave["by_class"]) == set(by_class)
        for cls, group in by_class.items():
            f = wave["by_class"][cls]
            ok = [t for t in group if t["state"] == "succeeded"]
            assert f["tasks"] == len(group)
            assert f["succeeded"] == len(ok)
            assert f["accuracy"] == pytest.approx(pooled([t["output"] for t in ok]))
            assert f["samples"] == sum(t["output"]["count"] for t in ok)
        assert wave["accuracy"] == pytest.approx(
            pooled([t["output"] for t in tasks if t["state"] == "succeeded"])
        )
        assert {t["output"]["digest"] for t in tasks if t["output"]} == {wave["model"]["digest"]}
    place = figures["placement"]
    counts = Counter(
        classes[recorded[i]["device_id"]] for w in figures["inference"] for i in w["task_ids"]
    )
    assert {c: p["tasks"] for c, p in place["by_class"].items() if p["tasks"]} == dict(counts)
    assert place["explained"] == sum(counts.values())
    for sample in place["samples"]:
        explained = api.get(f"/v1/tasks/{sample['task_id']}/explain").json()["explanation"]
        chosen = next(c for c in explained["candidates"] if c["chosen"])
        assert chosen["device_id"] == sample["device_id"]
        assert chosen["terms"]["total"] == pytest.approx(sample["chosen"]["terms"]["total"])


def check_models_and_rounds(api: httpx.Client, figures: dict[str, Any]) -> None:
    versions = {m["version"]: m for m in api.get("/v1/models/digits").json()["versions"]}
    waves = 2 if figures["redeploy"]["done"] else 1
    assert len(figures["quantization"]) == len(figures["deploy"]) == waves
    for q in figures["quantization"]:
        int8 = versions[q["int8"]["version"]]
        assert int8["precision"] == "int8"
        assert int8["digest"] == q["int8"]["digest"]
        assert int8["accuracy_int8"] == pytest.approx(q["accuracy_int8"])
        assert q["drop_points"] <= q["gate_points"]
    deploys = api.get("/v1/tasks", params={"kind": "deploy", "limit": 10000}).json()
    for d, q in zip(figures["deploy"], figures["quantization"], strict=True):
        mine = [t for t in deploys if t["params"]["digest"] == q["int8"]["digest"]]
        assert d["tasks"] == len(mine) == DEVICES
        assert d["succeeded"] == sum(t["state"] == "succeeded" for t in mine) == DEVICES
    fl = figures["federated"]
    job = api.get(f"/v1/fl/jobs/{fl['job_id']}").json()
    assert job["state"] == fl["status"] == "done"
    closed = [r for r in job["history"] if r["state"] == "closed"]
    assert [r["round"] for r in fl["rounds"]] == [r["round"] for r in closed]
    assert [r["round"] for r in closed] == list(range(1, ROUNDS + 1))
    assert [r["accuracy"] for r in fl["rounds"]] == pytest.approx([r["accuracy"] for r in closed])
    assert fl["final_model"]["digest"] == job["final_model"]["digest"]
    assert fl["final_accuracy"] == pytest.approx(job["final_model"]["accuracy"])
    improved = fl["final_accuracy"] > figures["quantization"][0]["fp32"]["accuracy_fp32"]
    assert figures["redeploy"]["done"] == improved, figures["redeploy"]
    train = [
        t
        for t in api.get("/v1/tasks", params={"kind": "train", "limit": 10000}).json()
        if t["params"].get("job") == fl["job_id"]
    ]
    assert fl["training"]["tasks"] == len(train) > 0
    devices = api.get("/v1/devices").json()
    assert figures["devices"]["total"] == len(devices) == DEVICES
    assert figures["devices"]["by_class"] == dict(Counter(d["device_class"] for d in devices))


def check_security(api: httpx.Client, workdir: Path, figures: dict[str, Any]) -> None:
    """TLS on both links, every device enrolled with its own broker account: read from the
    coordinator's database, the broker's files and real connections, then compared with what
    the report says."""
    ca = workdir / "ca" / "ca.crt"
    fleet_ca = client_context(ca)
    # HTTP: the API answered this client, which trusts the fleet CA only; plain HTTP gets
    # nothing from that port.
    assert figures["demo"]["api"].startswith("https://")
    assert security.plain_http_fails(figures["demo"]["api"])
    assert httpx.get(f"{figures['demo']['api']}/v1/devices", verify=fleet_ca).status_code == 401
    # Enrolment: one claim, used by every device, each with its own device token.
    ids = {d["id"] for d in api.get("/v1/devices").json()}
    enrolled = security.enrolled(workdir)
    assert set(enrolled) == ids
    assert len(set(enrolled.values())) == 1
    assert security.rows(workdir, "SELECT max_uses, uses FROM auth_claims") == [(DEVICES, DEVICES)]
    hashes = security.rows(workdir, "SELECT token_hash FROM auth_devices")
    assert len({h for (h,) in hashes}) == DEVICES  # a token of its own each
    # The broker: TLS only, no anonymous clients, the plugin holding one account per device
    # besides the coordinator's.
    conf = workdir / "broker" / "mosquitto.conf"
    (listener,) = security.listeners(conf)
    assert listener["options"]["certfile"] == str(workdir / "ca" / "server.crt")
    assert "allow_anonymous false" in conf.read_text()
    assert "mosquitto_dynamic_security.so" in conf.read_text()
    assert security.broker_usernames(workdir) == ids | {"coordinator"}
    # The coordinator's link: the broker has no other listener, and its log shows it in.
    assert "as coordinator" in (workdir / "broker" / "mosquitto.log").read_text()
    # Each device was told to use that TLS listener; its account works over TLS only.
    idents = security.identities(workdir)
    assert set(idents) == ids
    for ident in idents.values():
        assert ident["mqtt"]["tls"] is True
        assert ident["mqtt"]["port"] == listener["port"]
        assert ident["coordinator_url"] == figures["demo"]["api"]
    one = next(iter(idents.values()))["mqtt"]
    port, user, password = listener["port"], "probe-" + one["username"], one["password"]
    assert security.mqtt_connect(port, user, password, ca).startswith("refused")
    assert security.mqtt_connect(port, one["username"], "wrong", ca).startswith("refused")
    assert security.mqtt_connect(port, one["username"], password, None).startswith("no answer")
    # The report says what was measured.
    sec = figures["security"]
    assert sec["http"]["tls"]["ok"]
    assert sec["mqtt"]["tls"]["ok"]
    assert sec["devices_enrolled"] == sec["device_accounts"] == DEVICES
    assert sec["isolated"]
    assert sec["http"]["without_token"] == 401


@pytest.mark.timeout(360)
def test_quick_demo_reports_what_the_system_recorded(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    env = {**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin"}
    argv = [
        *(sys.executable, "-m", "lepton.demo", "--quick", "--keep"),
        *("--workdir", str(workdir)),
    ]
    started = time.monotonic()
    demo = subprocess.Popen(
        argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    out = Output(demo)
    try:
        deadline = time.monotonic() + 240
        while "Still running (--keep)" not in out.text:
            assert demo.poll() is None, f"the demo exited {demo.returncode}:\n{out.text[-3000:]}"
            assert time.monotonic() < deadline, f"no summary in time:\n{out.text[-3000:]}"
            time.sleep(0.5)
        wall = time.monotonic() - started
        figures = json.loads((workdir / "report" / "figures.json").read_text())
        assert "error" not in figures, figures.get("error")
        assert figures["demo"]["wall_s"] < 180
        assert wall < 180
        # The demo's own operator token, kept 0600 in its workdir (never in the report).
        token_file = workdir / "token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        assert token not in (workdir / "report" / "figures.json").read_text()
        headers = {"Authorization": f"Bearer {token}"}
        fleet_ca = client_context(workdir / "ca" / "ca.crt")  # the fleet CA only
        with httpx.Client(
            base_url=figures["demo"]["api"], timeout=10, headers=headers, verify=fleet_ca
        ) as api:
            check_inference(api, figures)
            check_models_and_rounds(api, figures)
            check_security(api, workdir, figures)
        html = (workdir / "report" / "report.html").read_text()
        for title in (
            "Devices by class",
            "Tasks per device class",
            "Task run time per device class",
            "Accuracy per federated round",
            "Unpinned inference tasks per device, by class",
        ):
            assert f'aria-label="{title}' in html, title
        assert str(workdir / "report" / "report.html") in out.text
        assert "Security (measured" in html
        # The command --keep suggests works as printed: HTTPS with the CA, the token.
        hint = re.search(r"lepton --api\s+(\S+)\s+--ca-file\s+(\S+)\s+devices ls", out.text)
        assert hint is not None, out.text[-2000:]
        listed = subprocess.run(
            [
                sys.executable,
                "-m",
                "lepton.coordinator.cli",
                "--api",
                hint[1],
                "--ca-file",
                hint[2],
                "devices",
                "ls",
                "--json",
            ],
            env={**env, "LEPTON_TOKEN": token},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert listed.returncode == 0, listed.stderr
        assert len(json.loads(listed.stdout)) == DEVICES
        assert f"{DEVICES}/{DEVICES} devices have their own" in out.text
        pids = json.loads((workdir / "pids.json").read_text())
    finally:
        demo.send_signal(signal.SIGTERM)
        try:
            demo.wait(timeout=90)
        finally:
            if demo.poll() is None:
                demo.kill()
    assert demo.returncode == 130
    left = {n: p for n, p in pids.items() if n != "demo" and pid_alive(p)}
    assert not left, f"still running after SIGTERM: {left}"
