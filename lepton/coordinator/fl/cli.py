"""``lepton fl``: start, follow and stop federated jobs through the coordinator's API.

- ``lepton fl start job.toml``: validate the job file here (a bad key is named before
  anything is sent), submit it, print the job id;
- ``lepton fl status``: every job; ``lepton fl status ID``: one job round by round;
  ``--watch`` redraws until the job ends;
- ``lepton fl stop ID``: cancel the open round, register the last global weights, stop.

Human tables by default, ``--json`` for scripts (global or after the subcommand).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Final

from rich.console import Console
from rich.table import Table

from lepton.coordinator.cli.client import ApiClient, CliError, client_of, client_options
from lepton.coordinator.cli.exitcodes import EXIT_OK, EXIT_USAGE
from lepton.protocol import routes

JOBS: Final = routes.FL_JOBS
ENDED: Final = ("done", "failed", "stopped")


def add_commands(top: Any) -> None:
    """Mount ``fl start|status|stop`` on the ``lepton`` parser's subcommands."""
    fl = top.add_parser("fl", help="federated learning jobs")
    sub = fl.add_subparsers(dest="fl_command", required=True, metavar="COMMAND")
    start = sub.add_parser("start", help="start a federated job from a TOML file")
    start.add_argument("file", type=Path, metavar="JOB.toml")
    client_options(start)
    start.set_defaults(handler=cmd_start)
    status = sub.add_parser("status", help="jobs, or one job round by round")
    status.add_argument("job_id", nargs="?", metavar="ID")
    status.add_argument("--watch", action="store_true", help="redraw until the job ends")
    status.add_argument("--interval", type=float, default=2.0, help="--watch refresh, seconds")
    client_options(status)
    status.set_defaults(handler=cmd_status)
    stop = sub.add_parser("stop", help="stop a job (its last global weights are registered)")
    stop.add_argument("job_id", metavar="ID")
    client_options(stop)
    stop.set_defaults(handler=cmd_stop)


def _client(args: argparse.Namespace) -> ApiClient:
    return client_of(args)


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------- commands


def cmd_start(args: argparse.Namespace) -> int:
    from lepton.coordinator.fl.jobs.spec import FLJob, JobError

    try:
        job = FLJob.from_toml(args.file)
    except JobError as exc:
        raise CliError(f"{args.file}: {exc}", EXIT_USAGE) from exc
    with _client(args) as api:
        created = api.post(JOBS, job.to_dict())
    if args.json:
        _print_json(created)
    else:
        sys.stdout.write(f"{created['id']}\n")
    return EXIT_OK


def cmd_stop(args: argparse.Namespace) -> int:
    with _client(args) as api:
        job = api.post(f"{JOBS}/{args.job_id}/stop", {})
    if args.json:
        _print_json(job)
    else:
        sys.stdout.write(f"{job['id']}: {job['state']}\n")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    console = Console(highlight=False)
    with _client(args) as api:
        if args.job_id is None:
            jobs = api.get(JOBS)
            if args.json:
                _print_json(jobs)
            else:
                console.print(jobs_table(jobs))
            return EXIT_OK
        shown: tuple[Any, ...] | None = None
        while True:
            job = api.get(f"{JOBS}/{args.job_id}")
            key = (job["state"], job["round"], len(job.get("history", [])), _live(job))
            if key != shown:
                shown = key
                if args.json:
                    _print_json(job)
                else:
                    print_job(console, job)
            if not args.watch or job["state"] in ENDED:
                return EXIT_OK
            time.sleep(max(0.2, args.interval))


def _live(job: dict[str, Any]) -> tuple[Any, ...]:
    rounds = job.get("history") or []
    last = rounds[-1] if rounds else {}
    return (last.get("uploaded"), last.get("accepted"), last.get("state"))


# ---------------------------------------------------------------- rendering


def _pct(value: Any) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, (int, float)) else "-"


def _num(value: Any, fmt: str = "{:.3f}") -> str:
    return fmt.format(value) if isinstance(value, (int, float)) else "-"


def _bytes(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return "-"  # pragma: no cover


def jobs_table(jobs: list[dict[str, Any]]) -> Table:
    table = Table(title="Federated jobs")
    for col in ("ID", "STATE", "ROUND", "STRATEGY", "SELECTION", "ACCURACY", "FINAL MODEL"):
        table.add_column(col)
    for j in jobs:
        final = j.get("final_model") or {}
        table.add_row(
            j["id"],
            j["state"],
            f"{min(j['round'], j['rounds'] or 0)}/{j['rounds']}",
            str(j.get("strategy") or "-"),
            str(j.get("selection") or "-"),
            _pct(j.get("accuracy")),
            f"{final['name']} v{final['version']}" if final else "-",
        )
    return table


def rounds_table(rounds: list[dict[str, Any]]) -> Table:
    table = Table(title="Rounds")
    cols = ("ROUND", "STATE", "SELECTED", "ACCEPTED", "REJECTED", "ACCURACY", "LOSS", "WALL")
    for col in (*cols, "UP"):
        table.add_column(col, justify="right" if col not in ("STATE",) else "left")
    for r in rounds:
        accepted = r.get("accepted")
        if r["state"] == "open":
            accepted = f"{accepted or 0} ({r.get('uploaded') or 0} up)"
        elif r.get("late"):
            accepted = f"{accepted} +{r['late']} late"
        table.add_row(
            str(r["round"]),
            r["state"] + (f" x{r['attempt']}" if r.get("attempt", 1) > 1 else ""),
            str(r["selected"]),
            str(accepted if accepted is not None else "-"),
            str(r.get("rejected") or 0),
            _pct(r.get("accuracy")),
            _num(r.get("loss")),
            _num(r.get("wall_s"), "{:.1f}s"),
            _bytes(r.get("bytes_up")),
        )
    return table


def print_job(console: Console, job: dict[str, Any]) -> None:
    spec = job.get("spec") or {}
    console.print(
        f"[bold]{job['id']}[/bold]  {job['state']}  round {min(job['round'], job['rounds'])}"
        f"/{job['rounds']}  {spec.get('model', '')} on {spec.get('data', '')!r}, "
        f"{job.get('strategy')}, {job.get('selection')} selection, "
        f"{spec.get('compression', 'fp32')} updates"
    )
    if job.get("error"):
        console.print(f"error: {job['error']}")
    history = job.get("history") or []
    if history:
        console.print(rounds_table(history))
    final = job.get("final_model")
    if final:
        console.print(
            f"final model: {final['name']} v{final['version']} ({final['format']}, "
            f"sha256 {final['digest'][:16]}..., accuracy {_pct(final.get('accuracy'))})"
        )
