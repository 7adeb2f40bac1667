"""The demo's figures, report views and plots from hand-made task records (no processes)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from lepton.demo import svg
from lepton.demo.figures import (
    inference_figures,
    percentile,
    placement_figures,
    training_figures,
)
from lepton.demo.html import write_html
from lepton.demo.report import accuracy_steps, class_summary, explain_text, security_lines

CLASSES = {"pi-1": "rpi4", "pi-2": "rpi4", "jet-1": "jetson-orin-nano"}


def infer_task(
    tid: str, device: str | None, *, correct: int = 90, ok: bool = True
) -> dict[str, Any]:
    return {
        "id": tid,
        "device_id": device,
        "state": "succeeded" if ok else "failed",
        "created_at": 100.0,
        "started_at": 100.5,
        "finished_at": 101.0 if device == "jet-1" else 102.0,
        "last_error": None if ok else "unknown_model: model 'digits' is not deployed here",
        "output": {
            "count": 100,
            "labelled": True,
            "correct": correct,
            "accuracy": correct / 100,
            "latency_ms": {"sample": {"p50": 0.1}},
        }
        if ok
        else None,
    }


def terms(completion: float) -> dict[str, float]:
    return {
        "queue_s": 0.0,
        "compute_s": completion - 0.05,
        "transfer_s": 0.0,
        "rtt_s": 0.05,
        "energy": 0.0,
        "battery": 0.0,
        "total": completion,
        "rate_gops": 100.0,
        "completion_s": completion,
    }


def test_percentile_interpolates() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 95) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile([0.0, 10.0], 95) == pytest.approx(9.5)


def test_inference_figures_pool_accuracy_per_class() -> None:
    tasks = [
        infer_task("a", "jet-1", correct=90),
        infer_task("b", "jet-1", correct=80),
        infer_task("c", "pi-1", correct=70),
        infer_task("d", "pi-2", ok=False),
    ]
    f = inference_figures(tasks, CLASSES)
    assert f["tasks"] == 4
    assert f["succeeded"] == 3
    assert f["accuracy"] == pytest.approx(240 / 300)
    jet, pi = f["by_class"]["jetson-orin-nano"], f["by_class"]["rpi4"]
    assert (jet["tasks"], jet["succeeded"], jet["devices"]) == (2, 2, 1)
    assert jet["accuracy"] == pytest.approx(0.85)
    assert jet["run_s"]["p50"] == pytest.approx(0.5)
    assert (pi["tasks"], pi["succeeded"], pi["failed"]) == (2, 1, 1)
    assert pi["run_s"]["p50"] == pytest.approx(1.5)
    assert f["errors"] == ["unknown_model: model 'digits' is not deployed here"]


def test_training_figures_per_class() -> None:
    ok: dict[str, Any] = {
        "state": "succeeded",
        "started_at": 1.0,
        "finished_at": 3.0,
        "device_id": "pi-1",
    }
    tasks: list[dict[str, Any]] = [
        {**ok, "id": "t1", "output": {"accuracy": 0.5, "examples": 40, "train_s": 1.0}},
        {**ok, "id": "t2", "device_id": "pi-2", "output": {"accuracy": 0.7, "examples": 60}},
        {"id": "t3", "device_id": "jet-1", "state": "failed", "output": None},
    ]
    f = training_figures(tasks, CLASSES)
    assert f["by_class"]["rpi4"]["local_accuracy"] == pytest.approx(0.6)
    assert f["by_class"]["rpi4"]["examples"] == 100
    assert f["by_class"]["jetson-orin-nano"]["failed"] == 1


def test_placement_prefers_samples_whose_runner_up_is_another_class() -> None:
    tasks = [infer_task("a", "jet-1"), infer_task("b", "jet-1"), infer_task("c", "pi-1")]
    same = {"device_id": "jet-1", "chosen": True, "terms": terms(0.06), "planned_tasks": 1}
    explanations = {
        "a": {"explanation": {"method": "exact", "candidates": [same]}},
        "b": {
            "explanation": {
                "method": "exact",
                "candidates": [same, {"device_id": "pi-1", "chosen": False, "terms": terms(0.2)}],
            }
        },
    }
    f = placement_figures(tasks, CLASSES, explanations)
    assert f["by_class"]["jetson-orin-nano"]["tasks"] == 2
    assert f["by_class"]["rpi4"]["tasks_per_device"] == pytest.approx(0.5)
    assert f["by_class"]["rpi4"]["compared"] == 1
    assert f["by_class"]["rpi4"]["best_completion_s"] == pytest.approx(0.2)
    assert f["explained"] == 2
    (sample,) = f["samples"]
    assert sample["task_id"] == "b"
    assert sample["runner_up_class"] == "rpi4"
    text = explain_text(sample)
    assert "next best pi-1 (rpi4): 200 ms" in text


def test_svg_charts_are_well_formed() -> None:
    bars = svg.bar_chart("A <title>", ["x", "y"], {"s1": [1.0, None], "s2": [2.0, 3.0]})
    line = svg.line_chart("L", [0, 1, 2], {"acc": [0.8, None, 0.9]}, fmt=lambda v: f"{v:.0%}")
    for chart in (bars, line):
        root = ET.fromstring(chart)
        assert root.tag.endswith("svg")
    assert "A &lt;title&gt;" in bars
    assert "<polyline" in line


def figures_sample() -> dict[str, Any]:
    wave = inference_figures([infer_task("a", "jet-1"), infer_task("c", "pi-1")], CLASSES)
    wave.update(wave=1, model={"name": "digits", "version": 2})
    return {
        "demo": {"started_at": 0.0, "wall_s": 10.0, "broker": "mosquitto", "api": "http://x"},
        "devices": {
            "total": 3,
            "by_class": {"jetson-orin-nano": 1, "rpi4": 2},
            "registration_s": 1,
        },
        "central": {"samples": 128, "epochs": 15, "accuracy": 0.8, "seconds": 1.0},
        "inference": [wave],
        "federated": {"status": "not_run", "reason": "the coordinator has no federated API"},
        "placement": placement_figures([infer_task("a", "jet-1")], CLASSES, {}),
    }


def test_views_and_html_report(tmp_path: Path) -> None:
    figures = figures_sample()
    rows = {r["class"]: r for r in class_summary(figures)}
    assert rows["rpi4"]["infer_tasks"] == 1
    assert rows["rpi4"]["accuracy_by_wave"] == [pytest.approx(0.9)]
    assert accuracy_steps(figures) == [("central FP32", 0.8), ("on devices", pytest.approx(0.9))]
    html = write_html(figures, tmp_path / "r.html").read_text()
    assert html.count("<svg") >= 4
    assert "Not run: the coordinator has no federated API" in html


def test_a_broker_without_accounts_or_tls_is_said_plainly(tmp_path: Path) -> None:
    """The embedded broker's posture (as lepton.demo.posture measures it) reads as missing
    protection in the summary and the HTML report, not as a quiet blank."""
    figures = figures_sample()
    figures["demo"]["devices"] = 2
    figures["security"] = {
        "http": {
            "url": "https://127.0.0.1:1",
            "tls": {"ok": True, "version": "TLSv1.3"},
            "without_token": 401,
        },
        "mqtt": {"port": 2, "tls": {"ok": False}, "listeners": []},
        "devices_enrolled": 2,
        "device_accounts": 0,
        "isolated": False,
        "warning": "devices are not isolated on this broker; install mosquitto",
        "operator_tokens": 1,
    }
    lines = security_lines(figures)
    assert "HTTPS (TLSv1.3" in lines[0]
    assert "NOT TLS" in lines[1]
    assert "2/2 devices enrolled" in lines[2]
    assert "NONE: devices are not isolated on this broker; install mosquitto" in lines[3]
    html = write_html(figures, tmp_path / "r.html").read_text()
    assert "<p class='warn'>Broker accounts: NONE: devices are not isolated" in html
    assert "<p class='warn'>MQTT: NOT TLS" in html
