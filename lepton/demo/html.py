"""The demo's HTML report: one self-contained file (inline CSS and SVG, no scripts), which
opens without network access."""

from __future__ import annotations

import platform
from collections.abc import Sequence
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import Any

from lepton.demo import svg
from lepton.demo.report import (
    WAVE_NAMES,
    accuracy_steps,
    class_cells,
    class_summary,
    explain_text,
    ms,
    not_chosen_text,
    num,
    pct,
    security_lines,
)

CSS = """
body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #ddd;padding:.3em .6em;text-align:right}
th:first-child,td:first-child{text-align:left}
.note{color:#555;font-size:.9em}.warn{background:#fff6e0;padding:.5em;border-left:4px solid #e0a800}
.charts{display:flex;flex-wrap:wrap;gap:1em}
"""


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _p(text: str, cls: str = "") -> str:
    attr = f" class='{cls}'" if cls else ""
    return f"<p{attr}>{escape(text)}</p>"


def charts(figures: dict[str, Any]) -> dict[str, str]:
    """The report's plots, by name (only those with data)."""
    out: dict[str, str] = {}
    fleet = figures.get("devices", {}).get("by_class", {})
    if fleet:
        out["devices"] = svg.bar_chart(
            "Devices by class", list(fleet), {"devices": list(fleet.values())}
        )
    rows = class_summary(figures)
    classes = [r["class"] for r in rows]
    waves = [w["wave"] for w in figures.get("inference", [])]
    if rows and waves:
        out["tasks"] = svg.bar_chart(
            "Tasks per device class",
            classes,
            {
                "inference": [r["infer_tasks"] for r in rows],
                "FL training": [r["train_tasks"] for r in rows],
                "deploy": [r["deploy_tasks"] for r in rows],
            },
        )
        out["latency"] = svg.bar_chart(
            "Task run time per device class, p50 (ms)",
            classes,
            {
                "inference": [_milli(r["infer_run_p50_s"]) for r in rows],
                "FL training": [_milli(r["train_run_p50_s"]) for r in rows],
            },
            fmt=lambda x: f"{x:,.0f}",
        )
        out["accuracy_class"] = svg.bar_chart(
            "Accuracy on the devices, per class",
            classes,
            {
                WAVE_NAMES.get(w, str(w)): [r["accuracy_by_wave"][i] for r in rows]
                for i, w in enumerate(waves)
            },
            fmt=lambda x: f"{x:.1%}",
            y_max=1.0,
        )
    steps = accuracy_steps(figures)
    if steps:
        out["accuracy_steps"] = svg.bar_chart(
            "Test accuracy through the loop",
            [name for name, _ in steps],
            {"accuracy": [v for _, v in steps]},
            fmt=lambda x: f"{x:.1%}",
            y_max=1.0,
        )
    fl_rounds = (figures.get("federated") or {}).get("rounds") or []
    if fl_rounds:
        base = figures.get("central", {}).get("accuracy")
        xs = [0.0] + [float(r["round"]) for r in fl_rounds]
        out["fl"] = svg.line_chart(
            "Accuracy per federated round (global model, test set)",
            xs,
            {"global model": [base] + [r.get("accuracy") for r in fl_rounds]},
            fmt=lambda x: f"{x:.1%}",
            x_label="round (0: the deployed, centrally trained model)",
        )
    place = figures.get("placement", {}).get("by_class", {})
    if place:
        out["placement"] = svg.bar_chart(
            "Unpinned inference tasks per device, by class",
            list(place),
            {"tasks per device": [p["tasks_per_device"] for p in place.values()]},
            fmt=lambda x: f"{x:.1f}",
        )
    return out


def _milli(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _loop_rows(figures: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    if "central" in figures:
        c = figures["central"]
        rows.append(
            (
                "central training",
                f"{c['samples']} labelled images, {c['epochs']} epochs, {c['seconds']:.1f}s",
                pct(c["accuracy"]),
            )
        )
    for q in figures.get("quantization", []):
        rows.append(
            (
                f"INT8 quantization ({q['int8']['name']} v{q['int8']['version']})",
                f"FP32 {pct(q['accuracy_fp32'])}, drop {q['drop_points']:.2f} points "
                f"(gate {q['gate_points']:g}), {q['size_fp32']:,} -> {q['size_int8']:,} bytes",
                pct(q["accuracy_int8"]),
            )
        )
    for d in figures.get("deploy", []):
        rows.append(
            (
                f"deploy {d['model']['name']} v{d['model']['version']}",
                f"{d['succeeded']}/{d['tasks']} devices, {d['bytes_downloaded']:,} bytes fetched",
                "",
            )
        )
    for w in figures.get("inference", []):
        rows.append(
            (
                f"inference, {WAVE_NAMES.get(w['wave'], w['wave'])}",
                f"{w['succeeded']}/{w['tasks']} tasks, placed by the cost model",
                pct(w["accuracy"]),
            )
        )
    fl = figures.get("federated") or {}
    if fl:
        what = fl.get("summary") or f"not run: {fl.get('reason', fl.get('status', ''))}"
        rows.append(("federated rounds", what, pct(fl.get("final_accuracy"))))
    redeploy = figures.get("redeploy") or {}
    if redeploy and not redeploy.get("done"):
        rows.append(("redeploy", str(redeploy.get("reason")), ""))
    return rows


def write_html(figures: dict[str, Any], path: Path) -> Path:
    """Write the report to ``path``; returns it."""
    plots = charts(figures)
    demo = figures.get("demo", {})
    when = datetime.fromtimestamp(demo.get("started_at", 0), UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Lepton demo report</title>",
        f"<style>{CSS}</style></head><body><h1>Lepton demo report</h1>",
        _p(
            f"{when} · {platform.node()} ({platform.machine()}) · wall time "
            f"{demo.get('wall_s', 0):.1f}s · {demo.get('broker', '')} · coordinator "
            f"{demo.get('api', '')}",
            "note",
        ),
    ]
    if "error" in figures:
        e = figures["error"]
        parts.append(_p(f"The run stopped at {e['stage']}: {e['message']}", "warn"))
    security = security_lines(figures)
    if security:
        parts.append("<h2>Security (measured from the running system)</h2>")
        parts += [_p(x, "warn" if "NOT" in x or "NONE" in x else "") for x in security]
    parts += [
        "<h2>The loop</h2>",
        _table(("step", "what happened", "test accuracy"), _loop_rows(figures)),
    ]
    parts.append(plots.get("accuracy_steps", ""))

    devices = figures.get("devices")
    parts.append("<h2>Devices by class</h2>")
    if devices:
        parts.append(
            _p(
                f"{devices['total']} devices registered and reporting in "
                f"{devices['registration_s']:.1f}s (simulated: each a real agent whose "
                "work takes as long as its profile's speed says)."
            )
        )
        parts.append(plots.get("devices", ""))

    waves = figures.get("inference", [])
    parts.append("<h2>Per device class: tasks, latency, accuracy</h2>")
    rows = class_summary(figures)
    headers = ["class", "devices", "deploys", "inference tasks", "run p50", "run p95"]
    headers += [f"accuracy, {WAVE_NAMES.get(w['wave'], w['wave'])}" for w in waves]
    headers += ["FL train tasks", "train run p50", "local accuracy after training"]
    parts.append(
        _table(
            headers,
            [(*class_cells(r), pct(r["local_accuracy"])) for r in rows],
        )
    )
    parts.append(
        "<div class='charts'>"
        + "".join(plots.get(k, "") for k in ("tasks", "latency", "accuracy_class"))
        + "</div>"
    )
    parts.append(
        _p(
            "Run time is measured by each agent, from the task's start to its end; a simulated "
            "device runs the real work on this host and stretches its time to the profile's "
            f"speed (this host: {num(demo.get('host_gflops'), '{:.1f}')} GFLOP/s effective on "
            "the digits CNN). Accuracy is what the devices reported for the test set they hold.",
            "note",
        )
    )

    fl = figures.get("federated") or {}
    parts.append("<h2>Accuracy per federated round</h2>")
    if fl.get("rounds"):
        parts.append(plots.get("fl", ""))
        parts.append(
            _table(
                ("round", "selected", "updates", "accuracy", "loss", "seconds"),
                [
                    (
                        str(r["round"]),
                        num(r.get("selected")),
                        num(r.get("updates")),
                        pct(r.get("accuracy")),
                        num(r.get("loss"), "{:.3f}"),
                        num(r.get("seconds"), "{:.1f}"),
                    )
                    for r in fl["rounds"]
                ],
            )
        )
    else:
        reason = fl.get("reason", "the run stopped before this stage")
        parts.append(_p(f"Not run: {reason}", "warn"))

    place = figures.get("placement")
    parts.append("<h2>Where tasks went and why</h2>")
    if place:
        parts.append(
            _p(
                f"{place['tasks']} inference tasks were submitted without a device. The "
                "scheduler placed each by the cost model: expected completion (queue wait + "
                "compute demand / learned throughput + transfer + round trip) plus energy and "
                "battery terms, solved over each batch of pending tasks. Deploy tasks were "
                "pinned (every device gets the model); FL training runs where the data is."
            )
        )
        parts.append(
            _table(
                (
                    "class",
                    "devices",
                    "tasks",
                    "tasks per device",
                    "share",
                    "ranked",
                    "best completion",
                ),
                [
                    (
                        cls,
                        str(p["devices"]),
                        str(p["tasks"]),
                        f"{p['tasks_per_device']:.1f}",
                        pct(p["share"]),
                        str(p["compared"]),
                        ms(p["best_completion_s"]),
                    )
                    for cls, p in place["by_class"].items()
                ],
            )
        )
        parts.append(plots.get("placement", ""))
        parts.append("<h3>Why, from the recorded explanations</h3>")
        parts.append(
            _table(
                ("task", "device", "class", "why"),
                [
                    (s["task_id"][:12], s["device_id"], s["device_class"], explain_text(s))
                    for s in place["samples"]
                ],
            )
        )
        parts += [_p(line) for line in not_chosen_text(place)]
    parts.append(
        _p(
            "Every figure is read back from the coordinator (task records and results, "
            "placement explanations, the federated job's rounds); figures.json next to this "
            "file holds the same figures.",
            "note",
        )
    )
    parts.append("</body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(parts))
    return path
