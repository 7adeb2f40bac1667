"""``lepton rollout create|ls|status|pause|resume|abort|approve``: staged rollouts through
the running coordinator's API.

``status ID --watch`` follows a rollout until it needs no one: it exits
:data:`~lepton.coordinator.cli.exitcodes.EXIT_OK` when it completed,
:data:`~lepton.coordinator.cli.exitcodes.EXIT_ROLLOUT_FAILED` when it was aborted or failed,
:data:`~lepton.coordinator.cli.exitcodes.EXIT_ROLLOUT_WAITING` while a phase waits for
approval (a pipeline approves after its own checks, then watches again). Other errors keep
the CLI's codes (3 no such rollout, 4 coordinator unreachable, 9 unauthorised).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from lepton.common.errors import LeptonError
from lepton.coordinator.cli.client import CliError, client_of, client_options
from lepton.coordinator.cli.exitcodes import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_ROLLOUT_FAILED,
    EXIT_ROLLOUT_WAITING,
    EXIT_USAGE,
)
from lepton.coordinator.cli.render import ago, fields_table, styled
from lepton.protocol import routes

Handler = Callable[[argparse.Namespace], int]
EXIT_OF_STATE = {
    "completed": EXIT_OK,
    "aborted": EXIT_ROLLOUT_FAILED,
    "failed": EXIT_ROLLOUT_FAILED,
    "waiting_approval": EXIT_ROLLOUT_WAITING,
}


def add_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``rollout`` with its sub-commands to an ``add_subparsers()`` object."""
    top: argparse.ArgumentParser = subparsers.add_parser(
        "rollout", help="staged rollouts of agent releases and models"
    )
    top.set_defaults(handler=run_rollout_command)
    sub = top.add_subparsers(dest="rollout_command", required=True, metavar="COMMAND")
    _add_create(sub)
    ls = sub.add_parser("ls", help="rollouts, newest first")
    ls.add_argument("--state", help="only rollouts in this state")
    ls.add_argument("--limit", type=int, default=50)
    client_options(ls)
    ls.set_defaults(rollout_handler=cmd_ls)
    st = sub.add_parser("status", help="a rollout: devices per state, and (--devices) each one")
    st.add_argument("rollout_id", metavar="ID")
    st.add_argument("--devices", action="store_true", help="one row per device, with reasons")
    st.add_argument("--state", dest="device_state", help="only devices in this state")
    st.add_argument("--limit", type=int, default=100)
    st.add_argument("--offset", type=int, default=0)
    st.add_argument(
        "--watch",
        action="store_true",
        help="follow until completed (exit 0), aborted/failed (10) or waiting for approval (11)",
    )
    st.add_argument("--interval", type=float, default=2.0, help="seconds between looks")
    st.add_argument("--timeout", dest="watch_timeout", type=float, help="give up after (exit 1)")
    client_options(st)
    st.set_defaults(rollout_handler=cmd_status)
    for name, text in (
        ("pause", "start no more devices (those under way finish)"),
        ("resume", "go on after a pause"),
        ("approve", "let the phase waiting for approval (else the next gated one) start"),
        ("abort", "stop; with --revert, take updated devices back"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("rollout_id", metavar="ID")
        if name == "abort":
            p.add_argument("--revert", action="store_true", help="take updated devices back")
        client_options(p)
        p.set_defaults(rollout_handler=cmd_move, action=name)
    return top


def _add_create(sub: Any) -> None:
    c = sub.add_parser(
        "create",
        help="start a staged rollout",
        description="Every given device criterion must hold; offline devices are included "
        "(--offline says what becomes of them). Phases are cumulative: "
        '"canary:5,10%%,50%%,100%%"; the last is 100%%.',
    )
    what = c.add_mutually_exclusive_group(required=True)
    what.add_argument("--release", metavar="NAME@VERSION", help="an agent release")
    what.add_argument("--model", metavar="NAME@VERSION", help="a registered model version")
    c.add_argument("--class", dest="device_class", metavar="C")
    c.add_argument("--tag", metavar="T")
    c.add_argument("--group", metavar="G")
    c.add_argument("--device", dest="device_ids", action="append", default=[], metavar="ID")
    c.add_argument("--phases", default="100%", help='e.g. "canary:5,10%%,50%%,100%%"')
    c.add_argument("--rate", help="max devices started per time: N/s, N/min, N/h")
    c.add_argument("--max-in-flight", type=int)
    c.add_argument("--success", type=float, help="share of a phase that must succeed (0.95)")
    c.add_argument("--abort-failure", type=float, help="abort above this failure share (0.2)")
    c.add_argument("--abort-min", type=int, help="...once this many devices finished (5)")
    c.add_argument("--device-timeout", type=float, help="seconds per device (900)")
    c.add_argument("--offline", choices=("wait", "skip"))
    c.add_argument(
        "--approve-after",
        type=int,
        action="append",
        default=[],
        metavar="PHASE",
        help="an operator approves after this phase (1-based) before the next starts",
    )
    c.add_argument("--revert-on-abort", action="store_true")
    c.add_argument("--health-deadline", type=float, help="agent releases: seconds (300)")
    c.add_argument("--previous-version", help="models: what a revert deploys")
    c.add_argument("--probe-source", metavar="S", help="models: infer on S before and after")
    c.add_argument("--max-accuracy-drop", type=float)
    c.add_argument("--max-latency-increase", type=float, help="relative p50 (0.2 = +20%%)")
    client_options(c)
    c.set_defaults(rollout_handler=cmd_create)


def plan_body(args: argparse.Namespace) -> dict[str, Any]:
    """The ``POST /v1/rollouts`` body the arguments describe (checked by the server too)."""
    from lepton.coordinator.rollouts.plan import PlanError, parse_phases, parse_rate

    ref = args.release or args.model
    name, sep, version = ref.partition("@")
    if not sep or not name or not version:
        raise PlanError(f"{ref!r}: want NAME@VERSION")
    body: dict[str, Any] = {
        "kind": "agent" if args.release else "model",
        "name": name,
        "version": version,
        "phases": [
            {k: v for k, v in (("count", p.count), ("percent", p.percent)) if v is not None}
            | ({"approval": True} if p.approval else {})
            for p in parse_phases(args.phases, tuple(args.approve_after))
        ],
    }
    selector = {
        k: v
        for k, v in (("device_class", args.device_class), ("tag", args.tag), ("group", args.group))
        if v is not None
    }
    if args.device_ids:
        selector["device_ids"] = args.device_ids
    if selector:
        body["selector"] = selector
    if args.rate:
        body["rate_count"], body["rate_window_s"] = parse_rate(args.rate)
    optional = {
        "max_in_flight": args.max_in_flight,
        "success_threshold": args.success,
        "abort_failure_share": args.abort_failure,
        "abort_min_finished": args.abort_min,
        "device_timeout_s": args.device_timeout,
        "offline": args.offline,
        "health_deadline_s": args.health_deadline,
        "previous_version": args.previous_version,
    }
    body |= {k: v for k, v in optional.items() if v is not None}
    if args.revert_on_abort:
        body["revert_on_abort"] = True
    if args.probe_source:
        probe = {
            "source": args.probe_source,
            "max_accuracy_drop": args.max_accuracy_drop,
            "max_latency_increase": args.max_latency_increase,
        }
        body["probe"] = {k: v for k, v in probe.items() if v is not None}
    elif args.max_accuracy_drop is not None or args.max_latency_increase is not None:
        raise PlanError("--max-accuracy-drop and --max-latency-increase need --probe-source")
    return body


def _print(args: argparse.Namespace, value: Any) -> bool:
    if getattr(args, "json", False):
        print(json.dumps(value, indent=2, sort_keys=True))
        return True
    return False


def cmd_create(args: argparse.Namespace) -> int:
    body = plan_body(args)
    with client_of(args) as api:
        created = api.post(routes.ROLLOUTS, body)
    if not _print(args, created):
        print(
            f"{created['id']}  {created['kind']} {created['name']}@{created['version']}: "
            f"{created['total']} devices, {created['phases']} phases"
        )
    return EXIT_OK


def cmd_ls(args: argparse.Namespace) -> int:
    with client_of(args) as api:
        found = api.get(routes.ROLLOUTS, state=args.state, limit=args.limit)
    if _print(args, found):
        return EXIT_OK
    t = Table(box=None, header_style="bold")
    for col in ("ROLLOUT", "KIND", "TARGET", "STATE", "PHASE", "DONE", "FAILED", "CREATED"):
        t.add_column(col)
    for r in found["rollouts"]:
        counts = r["counts"]
        failed = sum(counts[s] for s in ("failed", "rolled_back", "timed_out"))
        t.add_row(
            r["id"],
            r["kind"],
            f"{r['name']}@{r['version']}",
            styled(r["state"]),
            f"{r['phase'] + 1}/{r['phases']}",
            f"{counts['succeeded']}/{sum(counts.values())}",
            str(failed),
            ago(r["created_at"]),
        )
    Console().print(t)
    return EXIT_OK


def _status(api: Any, args: argparse.Namespace, devices: bool) -> Any:
    return api.get(
        routes.path(routes.ROLLOUT, rollout_id=args.rollout_id),
        devices=str(devices).lower(),
        state=args.device_state,
        limit=args.limit,
        offset=args.offset,
    )


def render_status(console: Console, s: dict[str, Any]) -> None:
    counts = ", ".join(f"{k} {v}" for k, v in s["counts"].items() if v)
    console.print(
        fields_table(
            [
                ("rollout", s["id"]),
                ("target", f"{s['kind']} {s['name']}@{s['version']}"),
                ("state", styled(s["state"])),
                ("phase", f"{s['phase'] + 1} of {s['phases']}"),
                ("reason", s["reason"]),
                ("devices", f"{s['total']}: {counts}"),
                ("created", f"{ago(s['created_at'])} by {s['created_by']}"),
            ]
        )
    )
    if s.get("devices"):
        t = Table(box=None, header_style="bold")
        for col in ("#", "DEVICE", "STATE", "STEP", "STARTED", "REASON"):
            t.add_column(col, overflow="fold")
        for d in s["devices"]:
            t.add_row(
                str(d["seq"]),
                d["device_id"],
                styled(d["state"]),
                d["step"] or "-",
                ago(d["started_at"]),
                d["reason"],
            )
        console.print(t)


def cmd_status(args: argparse.Namespace) -> int:
    console = Console()
    deadline = None if args.watch_timeout is None else time.monotonic() + args.watch_timeout
    with client_of(args) as api:
        while True:
            s = _status(api, args, args.devices)
            code = EXIT_OF_STATE.get(s["state"])
            if not args.watch or code is not None:
                break
            if deadline is not None and time.monotonic() > deadline:
                code = EXIT_ERROR
                break
            if not getattr(args, "json", False):
                counts = s["counts"]
                console.print(
                    f"{s['state']} phase {s['phase'] + 1}/{s['phases']}: "
                    f"{counts['succeeded']} succeeded, {counts['dispatched'] + counts['staged']} "
                    f"under way, {counts['pending']} pending"
                )
            time.sleep(max(args.interval, 0.1))
    if not _print(args, s):
        render_status(console, s)
    return code if args.watch and code is not None else EXIT_OK


def cmd_move(args: argparse.Namespace) -> int:
    path = routes.path(routes.ROLLOUT_ACTION, rollout_id=args.rollout_id, action=args.action)
    body = {"revert": True} if getattr(args, "revert", False) else {}
    with client_of(args) as api:
        rec = api.request("POST", path, json=body or None)
    if not _print(args, rec):
        print(f"{rec['id']}: {rec['state']} ({rec['reason']})")
    return EXIT_OK


def run_rollout_command(args: argparse.Namespace) -> int:
    """Run a parsed ``rollout`` command; errors go to stderr as an exit code."""
    from lepton.coordinator.rollouts.plan import PlanError

    handler: Handler = args.rollout_handler
    try:
        return handler(args)
    except PlanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except (LeptonError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lepton")
    add_commands(parser.add_subparsers(dest="command", required=True))
    return run_rollout_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
