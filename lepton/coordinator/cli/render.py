"""Human output for the CLI: rich tables of devices, tasks and placement explanations."""

from __future__ import annotations

import json
import time
from typing import Any

from rich.console import Console
from rich.table import Table

STATE_STYLE = {
    "online": "green",
    "offline": "red",
    "pending": "yellow",
    "assigned": "cyan",
    "running": "blue",
    "succeeded": "green",
    "failed": "red",
    "expired": "magenta",
    "cancelled": "dim",
}


def ago(ts: float | None, now: float | None = None) -> str:
    if ts is None:
        return "-"
    d = (time.time() if now is None else now) - ts
    future = d < 0
    d = abs(d)
    if d < 60:
        text = f"{d:.0f}s"
    elif d < 3600:
        text = f"{d / 60:.0f}m"
    elif d < 86400:
        text = f"{d / 3600:.1f}h"
    else:
        text = f"{d / 86400:.1f}d"
    return f"in {text}" if future else f"{text} ago"


def size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def num(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def styled(state: str) -> str:
    style = STATE_STYLE.get(state)
    return f"[{style}]{state}[/]" if style else state


def devices_table(devices: list[dict[str, Any]]) -> Table:
    t = Table(box=None, header_style="bold")
    for col in ("DEVICE", "STATE", "CLASS", "CPU", "MEM FREE", "SLOTS", "GFLOPS", "TEMP", "SEEN"):
        t.add_column(col)
    for d in devices:
        cap = d.get("capacity") or {}
        slots = (
            f"{cap.get('slots_busy', 0)}/{cap.get('slots_total')}"
            if cap.get("slots_total") is not None
            else "-"
        )
        t.add_row(
            d["id"],
            styled(d["state"]),
            d.get("device_class") or "-",
            f"{cap['cpu_count']}x {cap.get('cpu_percent') or 0:.0f}%"
            if cap.get("cpu_count")
            else "-",
            size(cap.get("memory_available")),
            slots,
            num(cap.get("fp32_gflops"), ".1f"),
            num(cap.get("temperature_c"), ".0f"),
            ago(d.get("last_seen")),
        )
    return t


def tasks_table(tasks: list[dict[str, Any]]) -> Table:
    t = Table(box=None, header_style="bold")
    for col in ("TASK", "KIND", "STATE", "DEVICE", "TRY", "CREATED", "ERROR"):
        t.add_column(col, overflow="fold")
    for task in tasks:
        t.add_row(
            task["id"],
            task["kind"],
            styled(task["state"]),
            task.get("device_id") or "-",
            f"{task['attempt']}/{task['max_attempts']}",
            ago(task.get("created_at")),
            (task.get("last_error") or "")[:60],
        )
    return t


def fields_table(rows: list[tuple[str, Any]]) -> Table:
    t = Table(box=None, show_header=False)
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    for key, value in rows:
        text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value
        t.add_row(key, "-" if text is None or text == "" else str(text))
    return t


def _join(items: list[str] | None) -> str:
    return ", ".join(items or []) or "-"


def print_device(console: Console, d: dict[str, Any]) -> None:
    cap = d.get("capacity") or {}
    slots = (
        f"{cap.get('slots_busy', '-')} busy, {cap.get('slots_queued', '-')} queued"
        f" of {cap.get('slots_total', '-')}"
    )
    bench = (
        f"{num(cap.get('fp32_gflops'), '.2f')} GFLOPS fp32,"
        f" {num(cap.get('int8_gops'), '.2f')} GOPS int8"
    )
    thermal = f"{num(cap.get('temperature_c'), '.1f')} C" + (
        " THROTTLED" if cap.get("throttled") else ""
    )
    console.print(
        fields_table(
            [
                ("device", d["id"]),
                ("state", styled(d["state"]) + f" since {ago(d['state_since'])}"),
                ("offline reason", d.get("offline_reason")),
                (
                    "class / model",
                    f"{d.get('device_class') or '-'} / {d.get('device_model') or '-'}",
                ),
                ("agent", d.get("agent_version")),
                ("runtimes", ", ".join(d.get("runtimes") or [])),
                ("accelerators", ", ".join(d.get("accelerators") or [])),
                ("data sources", ", ".join(d.get("data_sources") or [])),
                (
                    "tags / groups",
                    f"{_join(d.get('tags'))} / {_join(d.get('groups'))}",
                ),
                (
                    "last seen",
                    f"{ago(d['last_seen'])} (every {num(d.get('report_interval_s'), 'g')}s)",
                ),
                ("offline after", ago(d.get("heartbeat_deadline"))),
                (
                    "cpu",
                    f"{cap.get('cpu_count', '-')} cores, {num(cap.get('cpu_percent'), '.0f')}%",
                ),
                (
                    "memory free",
                    f"{size(cap.get('memory_available'))} of {size(cap.get('memory_total'))}",
                ),
                ("slots", slots),
                ("bench", bench),
                ("thermal", thermal),
                ("battery", num(cap.get("battery_percent"), ".0f")),
                (
                    "tasks",
                    ", ".join(f"{t['id']} ({t['state']})" for t in d.get("tasks", [])) or "-",
                ),
            ]
        )
    )


def print_task(console: Console, t: dict[str, Any]) -> None:
    console.print(
        fields_table(
            [
                ("task", t["id"]),
                ("kind", t["kind"]),
                ("state", styled(t["state"])),
                ("device", t.get("device_id")),
                ("attempt", f"{t['attempt']} of {t['max_attempts']}"),
                ("params", t.get("params")),
                ("spec", f"{t['model_class']} {t['precision']}, {t['demand_gops']:g} GOP"),
                ("created", ago(t["created_at"])),
                ("expires", ago(t["expires_at"])),
                ("next attempt", ago(t.get("next_attempt_at"))),
                ("started", ago(t.get("started_at"))),
                ("finished", ago(t.get("finished_at"))),
                ("last error", t.get("last_error")),
                ("output", t.get("output")),
            ]
        )
    )
    attempts = t.get("attempts") or []
    if attempts:
        a_table = Table(box=None, header_style="bold", title="attempts", title_justify="left")
        for col in ("#", "DEVICE", "ASSIGNED", "ACKED", "FINISHED", "OUTCOME", "ERROR"):
            a_table.add_column(col, overflow="fold")
        for a in attempts:
            a_table.add_row(
                str(a["attempt"]),
                a["device_id"],
                ago(a["assigned_at"]),
                ago(a.get("acked_at")),
                ago(a.get("finished_at")),
                a.get("outcome") or "-",
                (a.get("error") or "")[:60],
            )
        console.print(a_table)


def print_explanation(console: Console, body: dict[str, Any]) -> None:
    e = body.get("explanation")
    if e is None:
        console.print(f"task {body['task_id']} ({body['state']}) has not been planned yet")
        return
    head = f"task {body['task_id']} ({styled(body['state'])}), planned by {e.get('method')}"
    if e.get("device_id"):
        head += (
            f" -> [bold]{e['device_id']}[/],"
            f" expected start {num(e.get('expected_start_s'), '.3f')}s,"
            f" done {num(e.get('expected_completion_s'), '.3f')}s"
        )
    else:
        head += f": not placed ({e.get('reason')})"
    console.print(head)
    cands = e.get("candidates") or []
    if cands:
        t = Table(box=None, header_style="bold")
        for col in (
            "",
            "DEVICE",
            "TOTAL",
            "QUEUE s",
            "COMPUTE s",
            "TRANSFER s",
            "RTT s",
            "ENERGY J",
            "BATTERY",
            "PLANNED",
        ):
            t.add_column(col, justify="right" if col not in ("", "DEVICE") else "left")
        for c in cands:
            terms = c.get("terms") or {}
            t.add_row(
                "*" if c.get("chosen") else "",
                c["device_id"],
                num(terms.get("total")),
                num(terms.get("queue_s")),
                num(terms.get("compute_s")),
                num(terms.get("transfer_s")),
                num(terms.get("rtt_s")),
                num(terms.get("energy"), ".2f"),
                num(terms.get("battery"), ".2f"),
                str(c.get("planned_tasks", 0)),
            )
        console.print(t)
    if not e.get("complete", True):
        console.print("(large batch: only the chosen device's terms were kept)")
    counts = e.get("filtered_counts") or {}
    if counts:
        console.print("filtered out: " + ", ".join(f"{k} x{v}" for k, v in counts.items()))
        for c in e.get("filtered") or []:
            console.print(f"  {c['device_id']}: {c.get('reason')}")
