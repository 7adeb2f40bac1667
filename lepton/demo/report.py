"""The demo's results: the JSON file of figures, derived views of them, and the summary
printed at the end of a run (the HTML report is :mod:`lepton.demo.html`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

WAVE_NAMES = {1: "first model", 2: "after FL"}


def pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1%}"


def ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:,.0f} ms"


def num(v: Any, fmt: str = "{:g}") -> str:
    return "-" if v is None else fmt.format(v)


def write_json(figures: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2, sort_keys=True, default=str) + "\n")
    return path


# ---------------------------------------------------------------- derived views


def class_summary(figures: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per device class: devices, deploys, inference (per wave) and FL training."""
    fleet = figures.get("devices", {}).get("by_class", {})
    waves = figures.get("inference", [])
    deploys = figures.get("deploy", [])
    training = (figures.get("federated") or {}).get("training", {}).get("by_class", {})
    rows = []
    for cls, devices in fleet.items():
        infer = [w["by_class"].get(cls) for w in waves]
        done = [f for f in infer if f]
        run_p50 = [f["run_s"]["p50"] for f in done if f["run_s"]["p50"] is not None]
        deploy = [d["by_class"].get(cls) for d in deploys]
        deploy_p50 = [d["run_s"]["p50"] for d in deploy if d and d["run_s"]["p50"] is not None]
        train = training.get(cls) or {}
        rows.append(
            {
                "class": cls,
                "devices": devices,
                "deploy_ok": sum(d["succeeded"] for d in deploy if d),
                "deploy_tasks": sum(d["tasks"] for d in deploy if d),
                "deploy_run_p50_s": max(deploy_p50) if deploy_p50 else None,
                "infer_tasks": sum(f["tasks"] for f in done),
                "infer_ok": sum(f["succeeded"] for f in done),
                "infer_run_p50_s": max(run_p50) if run_p50 else None,
                "infer_run_p95_s": max(
                    (f["run_s"]["p95"] for f in done if f["run_s"]["p95"] is not None),
                    default=None,
                ),
                "accuracy_by_wave": [f["accuracy"] if f else None for f in infer],
                "train_tasks": train.get("tasks", 0),
                "train_ok": train.get("succeeded", 0),
                "train_run_p50_s": (train.get("run_s") or {}).get("p50"),
                "local_accuracy": train.get("local_accuracy"),
            }
        )
    return rows


def class_cells(row: dict[str, Any]) -> tuple[str, ...]:
    """A :func:`class_summary` row as the cells both reports show, in their column order."""
    return (
        row["class"],
        str(row["devices"]),
        f"{row['deploy_ok']}/{row['deploy_tasks']}",
        f"{row['infer_ok']}/{row['infer_tasks']}",
        ms(row["infer_run_p50_s"]),
        ms(row["infer_run_p95_s"]),
        *(pct(a) for a in row["accuracy_by_wave"]),
        f"{row['train_ok']}/{row['train_tasks']}",
        ms(row["train_run_p50_s"]),
    )


def accuracy_steps(figures: dict[str, Any]) -> list[tuple[str, float | None]]:
    """Test-set accuracy at each step of the loop, as recorded."""
    steps: list[tuple[str, float | None]] = []
    if "central" in figures:
        steps.append(("central FP32", figures["central"]["accuracy"]))
    quants = figures.get("quantization", [])
    waves = {w["wave"]: w for w in figures.get("inference", [])}
    if quants:
        steps.append(("INT8 (gate)", quants[0]["accuracy_int8"]))
    if 1 in waves:
        steps.append(("on devices", waves[1]["accuracy"]))
    fl = figures.get("federated") or {}
    if fl.get("final_accuracy") is not None:
        steps.append(("after FL, FP32", fl["final_accuracy"]))
    if len(quants) > 1:
        steps.append(("after FL, INT8", quants[1]["accuracy_int8"]))
    if 2 in waves:
        steps.append(("after FL, on devices", waves[2]["accuracy"]))
    return steps


def security_lines(figures: dict[str, Any]) -> list[str]:
    """What :mod:`lepton.demo.posture` measured, one line each ([] if it was not measured);
    a missing protection is said plainly ("NOT TLS", "not isolated")."""
    sec = figures.get("security")
    if not sec:
        return []
    devices = figures.get("demo", {}).get("devices", "?")
    http, mqtt = sec["http"], sec["mqtt"]
    plain = [x["port"] for x in mqtt["listeners"] if not x["tls"]]
    return [
        "HTTP API: "
        + (
            f"HTTPS ({http['tls']['version']}, verified with the fleet CA)"
            if http["tls"]["ok"]
            else f"NOT TLS ({http['tls'].get('error', 'no handshake')})"
        )
        + f"; a call without a token is refused ({http['without_token']})",
        "MQTT: "
        + (
            f"TLS ({mqtt['tls']['version']}, verified with the fleet CA) on port {mqtt['port']}"
            if mqtt["tls"]["ok"]
            else f"NOT TLS (plain MQTT on port {mqtt['port']})"
        )
        + (f"; plain listeners also on {plain}" if plain else ""),
        f"Enrolment: {sec['devices_enrolled']}/{devices} devices enrolled, each with its own"
        " device token",
        (
            f"Broker accounts: {sec['device_accounts']}/{devices} devices have their own"
            " (dynamic security plugin)"
            if sec["isolated"]
            else f"Broker accounts: NONE: {sec['warning']}"
        ),
        f"Operator tokens: {sec['operator_tokens']} (every API call carries one)",
    ]


def explain_text(sample: dict[str, Any]) -> str:
    """One sentence on why a task went where it did (cost terms against the runner-up)."""
    c = sample["chosen"]["terms"]
    text = (
        f"expected completion {c['completion_s'] * 1000:,.0f} ms "
        f"(queue {c['queue_s'] * 1000:,.0f}, compute {c['compute_s'] * 1000:,.1f}, "
        f"transfer {c['transfer_s'] * 1000:,.1f}, round trip {c['rtt_s'] * 1000:,.0f} ms; "
        f"rate {c['rate_gops']:,.3g} GOP/s)"
    )
    r = sample.get("runner_up")
    if r and r.get("terms"):
        rt = r["terms"]
        text += (
            f"; next best {r['device_id']} ({sample.get('runner_up_class')}): "
            f"{rt['completion_s'] * 1000:,.0f} ms, cost {rt['total']:.3f} vs {c['total']:.3f}"
        )
    planned = sample["chosen"].get("planned_tasks")
    if planned:
        text += f"; the plan gave the chosen device {planned} task(s) of its batch"
    return text


def not_chosen_text(place: dict[str, Any]) -> list[str]:
    """For classes that got no unpinned task: whether the scheduler ever ranked them."""
    out = []
    for cls, p in place["by_class"].items():
        if p["tasks"]:
            continue
        if p["compared"]:
            out.append(
                f"{cls}: ranked among the next best {p['compared']} times, best expected "
                f"completion {ms(p['best_completion_s'])}, never the cheapest"
            )
        else:
            out.append(
                f"{cls}: never among the three cheapest devices for any task "
                "(slower lanes: a higher expected completion)"
            )
    return out


# ---------------------------------------------------------------- console


def _class_table(figures: dict[str, Any]) -> Table:
    waves = figures.get("inference", [])
    t = Table(title="Per device class (as the coordinator recorded it)", title_justify="left")
    headers = ["class", "devices", "deploys", "infer tasks", "infer run p50", "infer run p95"]
    headers += [f"accuracy, {WAVE_NAMES.get(w['wave'], w['wave'])}" for w in waves]
    headers += ["FL train tasks", "train run p50"]
    for h in headers:
        t.add_column(h, justify="left" if h == "class" else "right")
    for r in class_summary(figures):
        t.add_row(*class_cells(r))
    return t


def _rounds_table(rounds: list[dict[str, Any]]) -> Table:
    t = Table(title="Federated rounds (global model on the test set)", title_justify="left")
    for col in ("round", "selected", "updates", "accuracy", "loss", "seconds"):
        t.add_column(col, justify="right")
    for r in rounds:
        t.add_row(
            str(r["round"]),
            num(r.get("selected")),
            num(r.get("updates")),
            pct(r.get("accuracy")),
            num(r.get("loss"), "{:.3f}"),
            num(r.get("seconds"), "{:.1f}"),
        )
    return t


def _placement_table(place: dict[str, Any]) -> Table:
    t = Table(title="Where unpinned inference tasks went (cost model)", title_justify="left")
    for col in ("class", "devices", "tasks", "tasks/device", "share"):
        t.add_column(col, justify="left" if col == "class" else "right")
    for cls, p in place["by_class"].items():
        t.add_row(
            cls,
            str(p["devices"]),
            str(p["tasks"]),
            f"{p['tasks_per_device']:.1f}",
            pct(p["share"]),
        )
    return t


def release_lines(figures: dict[str, Any]) -> list[str]:
    """The release stages in a sentence each (nothing when they did not run)."""
    out = []
    good, bad = figures.get("release"), figures.get("release_bad")
    if good:
        total = sum(good["by_state"].values())
        out.append(
            f"Release {good['version']}: {good['state']}, "
            f"{good['by_state'].get('succeeded', 0)}/{total} devices committed in "
            f"{good['seconds']:.1f}s"
        )
    if bad:
        took = sum(n for s, n in bad["by_state"].items() if s not in ("pending", "skipped"))
        back = ", ".join(f"{n} on {v}" for v, n in sorted(bad["versions"].items()))
        out.append(
            f"Broken release {bad['version']}: {bad['state']} in phase {bad['phase']} after "
            f"{took} devices ({bad['by_state'].get('rolled_back', 0)} rolled back by "
            f"themselves, {bad['by_state'].get('reverted', 0)} reverted); fleet: {back}"
        )
    return out


def print_summary(console: Console, figures: dict[str, Any], paths: Sequence[Path]) -> None:
    """The end-of-run summary: security, per class, per round, placement, and where the
    files are."""
    lines = security_lines(figures)
    if lines:
        console.print("[bold]Security (measured)[/]")
        for line in lines:
            style = "red" if "NOT" in line or "NONE" in line else ""
            console.print(f"  [{style}]{line}[/]" if style else f"  {line}", highlight=False)
    console.print(_class_table(figures))
    fl = figures.get("federated") or {}
    if fl.get("rounds"):
        console.print(_rounds_table(fl["rounds"]))
    elif fl:
        console.print(f"[yellow]Federated rounds: not run[/] ({fl.get('reason', 'unknown')})")
    place = figures.get("placement")
    if place:
        console.print(_placement_table(place))
        for s in place["samples"]:
            console.print(f"  why {s['device_id']}: {explain_text(s)}", highlight=False)
        for line in not_chosen_text(place):
            console.print(f"  {line}", highlight=False)
    redeploy = figures.get("redeploy") or {}
    if redeploy and not redeploy.get("done"):
        console.print(f"[yellow]Redeploy:[/] {redeploy.get('reason')}")
    steps = " -> ".join(f"{name} {pct(v)}" for name, v in accuracy_steps(figures))
    if steps:
        console.print(f"Accuracy: {steps}", highlight=False)
    for line in release_lines(figures):
        console.print(line, highlight=False)
    demo = figures.get("demo", {})
    if "wall_s" in demo:
        console.print(f"Wall time: {demo['wall_s']:.1f}s", highlight=False)
    for p in paths:
        console.print(f"Report: [bold]{p}[/]")
