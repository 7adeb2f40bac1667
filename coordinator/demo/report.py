"""The demo's results: a JSON file of the figures, a self-contained HTML report with inline
SVG plots, and the summary tables printed at the end of the run."""

from __future__ import annotations

import json
import platform
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from coordinator.demo import svg


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{v:.1%}"


def _ms(v: float | None) -> str:
    return "–" if v is None else f"{v * 1000:.0f} ms"


def _num(v: Any, fmt: str = "{:g}") -> str:
    return "–" if v is None else fmt.format(v)


def write_json(figures: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2, sort_keys=True, default=str) + "\n")
    return path


# ---------------------------------------------------------------- derived views


def class_rows(figures: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (inference wave, device class)."""
    rows = []
    for wave in figures.get("inference", []):
        for cls, f in wave["by_class"].items():
            rows.append(
                {"wave": wave["wave"], "version": wave["model"]["version"], "class": cls, **f}
            )
    return rows


def accuracy_steps(figures: dict[str, Any]) -> list[tuple[str, float | None]]:
    """Test-set accuracy at each step of the loop, as recorded."""
    steps: list[tuple[str, float | None]] = []
    if "central" in figures:
        steps.append(("central FP32", figures["central"]["accuracy"]))
    quants = figures.get("quantization", [])
    waves = {w["wave"]: w for w in figures.get("inference", [])}
    if quants:
        steps.append(("v1 INT8 (gate)", quants[0]["accuracy_int8"]))
    if 1 in waves:
        steps.append(("v1 on devices", waves[1]["accuracy"]))
    fl = figures.get("federated", {})
    if fl.get("final_accuracy") is not None:
        steps.append(("after FL (FP32)", fl["final_accuracy"]))
    if len(quants) > 1:
        steps.append(("v2 INT8 (gate)", quants[1]["accuracy_int8"]))
    if 2 in waves:
        steps.append(("v2 on devices", waves[2]["accuracy"]))
    return steps


# ---------------------------------------------------------------- console


def print_summary(console: Console, figures: dict[str, Any], paths: Sequence[Path]) -> None:
    """The end-of-run summary: per class, per round, placement, and where the files are."""
    t = Table(
        title="Inference per device class (recorded by the coordinator)", title_justify="left"
    )
    for col in (
        "wave",
        "class",
        "devices",
        "tasks",
        "ok",
        "accuracy",
        "run p50",
        "run p95",
        "end-to-end p50",
    ):
        t.add_column(col, justify="left" if col == "class" else "right")
    for r in class_rows(figures):
        t.add_row(
            f"v{r['version']}",
            r["class"],
            str(r["devices"]),
            str(r["tasks"]),
            str(r["succeeded"]),
            _pct(r["accuracy"]),
            _ms(r["run_s"]["p50"]),
            _ms(r["run_s"]["p95"]),
            _ms(r["end_to_end_s"]["p50"]),
        )
    console.print(t)
    fl = figures.get("federated") or {}
    if fl.get("rounds"):
        rt = Table(title="Federated rounds", title_justify="left")
        for col in ("round", "updates", "accuracy", "loss", "seconds"):
            rt.add_column(col, justify="right")
        for r in fl["rounds"]:
            rt.add_row(
                str(r["round"]),
                _num(r.get("updates")),
                _pct(r.get("accuracy")),
                _num(r.get("loss"), "{:.3f}"),
                _num(r.get("seconds"), "{:.1f}"),
            )
        console.print(rt)
    elif fl:
        console.print(f"[yellow]Federated rounds: not run[/] ({fl.get('reason', 'unknown')})")
    place = figures.get("placement")
    if place:
        pt = Table(title="Where unpinned tasks went (cost model)", title_justify="left")
        for col in ("class", "devices", "tasks", "tasks/device", "share"):
            pt.add_column(col, justify="left" if col == "class" else "right")
        for cls, p in place["by_class"].items():
            pt.add_row(
                cls,
                str(p["devices"]),
                str(p["tasks"]),
                f"{p['tasks_per_device']:.1f}",
                _pct(p["share"]),
            )
        console.print(pt)
        for s in place["samples"]:
            console.print(f"  why {s['device_id']}: {explain_text(s)}", highlight=False)
    steps = " -> ".join(f"{name} {_pct(v)}" for name, v in accuracy_steps(figures))
    if steps:
        console.print(f"Accuracy: {steps}", highlight=False)
    demo = figures.get("demo", {})
    if "wall_s" in demo:
        console.print(f"Wall time: {demo['wall_s']:.1f}s", highlight=False)
    for p in paths:
        console.print(f"Report: [bold]{p}[/]")


def explain_text(sample: dict[str, Any]) -> str:
    """One sentence on why a task went where it did (cost terms against the runner-up)."""
    c = sample["chosen"]["terms"]
    text = (
        f"expected completion {c['completion_s'] * 1000:.0f} ms "
        f"(queue {c['queue_s'] * 1000:.0f}, compute {c['compute_s'] * 1000:.1f}, "
        f"transfer {c['transfer_s'] * 1000:.1f}, round trip {c['rtt_s'] * 1000:.0f} ms)"
    )
    r = sample.get("runner_up")
    if r and r.get("terms"):
        rt = r["terms"]
        text += (
            f"; runner-up {r['device_id']} ({sample.get('runner_up_class')}) "
            f"{rt['completion_s'] * 1000:.0f} ms, total cost {rt['total']:.3f} vs {c['total']:.3f}"
        )
    planned = sample["chosen"].get("planned_tasks")
    if planned:
        text += f"; the plan gave this device {planned} task(s) of the batch"
    return text


# ---------------------------------------------------------------- HTML


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _charts(figures: dict[str, Any]) -> dict[str, str]:
    charts: dict[str, str] = {}
    devices = figures.get("devices", {}).get("by_class", {})
    if devices:
        charts["devices"] = svg.bar_chart(
            "Devices by class", list(devices), {"devices": list(devices.values())}
        )
    rows = class_rows(figures)
    classes = sorted({r["class"] for r in rows})
    waves = sorted({r["version"] for r in rows})
    pick: Callable[[int, str, str], float | None] = lambda v, c, k: next(  # noqa: E731
        (r[k] for r in rows if r["version"] == v and r["class"] == c), None
    )
    if rows:
        charts["tasks"] = svg.bar_chart(
            "Inference tasks per device class",
            classes,
            {f"model v{v}": [pick(v, c, "tasks") for c in classes] for v in waves},
        )
        latency: dict[str, list[float | None]] = {}
        for v in waves:
            for q in ("p50", "p95"):
                latency[f"v{v} {q}"] = [
                    (r["run_s"][q] * 1000 if r["run_s"][q] is not None else None)
                    for c in classes
                    for r in rows
                    if r["version"] == v and r["class"] == c
                ]
        charts["latency"] = svg.bar_chart(
            "Task run time per device class (ms)", classes, latency, fmt=lambda x: f"{x:.0f}"
        )
        charts["accuracy_class"] = svg.bar_chart(
            "Accuracy on devices per class",
            classes,
            {f"model v{v}": [pick(v, c, "accuracy") for c in classes] for v in waves},
            fmt=lambda x: f"{x:.1%}",
            y_max=1.0,
        )
    steps = accuracy_steps(figures)
    if steps:
        charts["accuracy_steps"] = svg.bar_chart(
            "Test accuracy through the loop",
            [name for name, _ in steps],
            {"accuracy": [v for _, v in steps]},
            fmt=lambda x: f"{x:.1%}",
            y_max=1.0,
        )
    fl_rounds = (figures.get("federated") or {}).get("rounds") or []
    if fl_rounds:
        base = figures.get("central", {}).get("accuracy")
        xs = [float(r["round"]) for r in fl_rounds]
        series: dict[str, list[float | None]] = {
            "global model": [r.get("accuracy") for r in fl_rounds]
        }
        if base is not None:
            series["central seed-set model"] = [base] * len(xs)
        charts["fl"] = svg.line_chart(
            "Accuracy per federated round (central test set)",
            xs,
            series,
            fmt=lambda x: f"{x:.1%}",
            x_label="round",
        )
    place = figures.get("placement", {}).get("by_class", {})
    if place:
        charts["placement"] = svg.bar_chart(
            "Unpinned tasks per device, by class",
            list(place),
            {"tasks per device": [p["tasks_per_device"] for p in place.values()]},
            fmt=lambda x: f"{x:.1f}",
        )
    return charts


CSS = """
body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #ddd;padding:.3em .6em;text-align:right}
th:first-child,td:first-child{text-align:left}
.note{color:#555;font-size:.9em}.warn{background:#fff6e0;padding:.5em;border-left:4px solid #e0a800}
.charts{display:flex;flex-wrap:wrap;gap:1em}
"""


def write_html(figures: dict[str, Any], path: Path) -> Path:
    """A self-contained HTML report (inline CSS and SVG; opens without network access)."""
    charts = _charts(figures)
    demo = figures.get("demo", {})
    when = datetime.fromtimestamp(demo.get("started_at", 0), UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Lepton demo report</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>Lepton demo report</h1>",
        f"<p class='note'>{escape(when)} · {escape(platform.node())} "
        f"({escape(platform.machine())}) · wall time {demo.get('wall_s', 0):.1f}s · "
        f"{escape(str(demo.get('broker', '')))} · coordinator {escape(str(demo.get('api', '')))}</p>",
    ]
    if "error" in figures:
        e = figures["error"]
        parts.append(
            f"<p class='warn'>The run stopped at <b>{escape(e['stage'])}</b>: {escape(e['message'])}</p>"
        )
    # The loop
    parts.append("<h2>The loop</h2>")
    loop_rows = []
    if "central" in figures:
        c = figures["central"]
        loop_rows.append(
            (
                "central training",
                f"{c['samples']} labelled images, {c['epochs']} epochs",
                _pct(c["accuracy"]),
            )
        )
    for q in figures.get("quantization", []):
        loop_rows.append(
            (
                f"INT8 quantization v{q['int8']['version']}",
                f"drop {q['drop_points']:.2f} pt (gate {q['gate_points']:g}), {q['size_fp32']:,} -> {q['size_int8']:,} bytes",
                _pct(q["accuracy_int8"]),
            )
        )
    for d in figures.get("deploy", []):
        loop_rows.append(
            (f"deploy v{d['model']['version']}", f"{d['succeeded']}/{d['tasks']} devices", "")
        )
    for w in figures.get("inference", []):
        loop_rows.append(
            (
                f"inference v{w['model']['version']}",
                f"{w['succeeded']}/{w['tasks']} tasks",
                _pct(w["accuracy"]),
            )
        )
    fl = figures.get("federated") or {}
    if fl:
        loop_rows.append(
            (
                "federated rounds",
                fl.get("summary") or fl.get("reason") or fl.get("status", ""),
                _pct(fl.get("final_accuracy")),
            )
        )
    parts.append(_table(("step", "what happened", "test accuracy"), loop_rows))
    if "accuracy_steps" in charts:
        parts.append(charts["accuracy_steps"])
    # Devices
    devices = figures.get("devices", {})
    parts.append("<h2>Devices by class</h2>")
    if devices:
        parts.append(
            f"<p>{devices['total']} devices registered and reporting in {devices['registration_s']:.1f}s.</p>"
        )
        parts.append(charts.get("devices", ""))
    # Per class
    parts.append("<h2>Inference per device class</h2>")
    rows = class_rows(figures)
    parts.append(
        _table(
            (
                "model",
                "class",
                "devices",
                "tasks",
                "succeeded",
                "accuracy",
                "run p50",
                "run p95",
                "end-to-end p50",
                "end-to-end p95",
                "host ms/sample p50",
            ),
            [
                (
                    f"v{r['version']}",
                    r["class"],
                    str(r["devices"]),
                    str(r["tasks"]),
                    str(r["succeeded"]),
                    _pct(r["accuracy"]),
                    _ms(r["run_s"]["p50"]),
                    _ms(r["run_s"]["p95"]),
                    _ms(r["end_to_end_s"]["p50"]),
                    _ms(r["end_to_end_s"]["p95"]),
                    _num(r["host_sample_ms"]["p50"], "{:.3f}"),
                )
                for r in rows
            ],
        )
    )
    parts.append(
        "<div class='charts'>"
        + "".join(charts.get(k, "") for k in ("tasks", "latency", "accuracy_class"))
        + "</div>"
    )
    parts.append(
        "<p class='note'>Run time is measured by each agent (task start to finish); a simulated "
        "device runs the real model on this host and stretches the time to its profile's "
        "speed. End-to-end adds queueing, placement and dispatch. Host ms/sample is ONNX "
        "Runtime's own per-sample latency on this machine, the same for every class.</p>"
    )
    # FL
    parts.append("<h2>Accuracy per federated round</h2>")
    if fl.get("rounds"):
        parts.append(charts.get("fl", ""))
        parts.append(
            _table(
                ("round", "updates", "accuracy", "loss", "seconds"),
                [
                    (
                        str(r["round"]),
                        _num(r.get("updates")),
                        _pct(r.get("accuracy")),
                        _num(r.get("loss"), "{:.3f}"),
                        _num(r.get("seconds"), "{:.1f}"),
                    )
                    for r in fl["rounds"]
                ],
            )
        )
    else:
        parts.append(
            f"<p class='warn'>Not run: {escape(str(fl.get('reason', 'the run stopped before this stage')))}</p>"
        )
    # Placement
    place = figures.get("placement")
    parts.append("<h2>Where tasks went and why</h2>")
    if place:
        parts.append(
            f"<p>{place['tasks']} inference tasks were submitted without a device; the scheduler "
            "placed each by the cost model (expected completion: queue wait + compute demand / "
            "measured throughput + transfer + round trip, plus energy and battery terms).</p>"
        )
        parts.append(
            _table(
                ("class", "devices", "tasks", "tasks per device", "share"),
                [
                    (
                        cls,
                        str(p["devices"]),
                        str(p["tasks"]),
                        f"{p['tasks_per_device']:.1f}",
                        _pct(p["share"]),
                    )
                    for cls, p in place["by_class"].items()
                ],
            )
        )
        parts.append(charts.get("placement", ""))
        parts.append("<h3>Sample explanations</h3>")
        parts.append(
            _table(
                ("task", "device", "class", "why"),
                [
                    (s["task_id"], s["device_id"], s["device_class"], explain_text(s))
                    for s in place["samples"]
                ],
            )
        )
    parts.append(
        "<p class='note'>Figures are read back from the coordinator (task records, results, "
        "explanations, federated job state); the same figures are in the JSON file next to "
        "this report.</p></body></html>"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(parts))
    return path
