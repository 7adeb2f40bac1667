"""``lepton audit``: the coordinator's audit log, through its API (scope ``admin``)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from lepton.coordinator.auth.cli import parse_duration
from lepton.coordinator.cli.client import client_of, client_options
from lepton.coordinator.cli.exitcodes import EXIT_OK
from lepton.protocol import routes


def add_commands(top: Any) -> None:
    audit = top.add_parser(
        "audit", help="the audit log: who did what, when (newest first; token scope admin)"
    )
    audit.add_argument("--since", help="only this recent, e.g. 1h, 7d")
    audit.add_argument("--actor", help="operator:NAME, device:ID, or just the name")
    audit.add_argument("--action", help='e.g. "enroll", "revoke", "POST /v1/tasks"')
    audit.add_argument("--outcome", help='e.g. "ok", "401 unknown_token"')
    audit.add_argument("--limit", type=int, default=50)
    client_options(audit)
    audit.set_defaults(handler=cmd_audit)


def cmd_audit(args: argparse.Namespace) -> int:
    since = time.time() - parse_duration(args.since) if args.since else None
    with client_of(args) as api:
        records = api.get(
            routes.AUDIT,
            since=since,
            actor=args.actor,
            action=args.action,
            outcome=args.outcome,
            limit=args.limit,
        )
    if getattr(args, "json", False):
        sys.stdout.write(json.dumps(records, indent=2) + "\n")
        return EXIT_OK
    from rich.console import Console
    from rich.table import Table

    table = Table("when", "actor", "action", "target", "outcome", "from")
    for r in records:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["at"]))
        table.add_row(when, r["actor"], r["action"], r["target"], r["outcome"], r["remote"])
    Console(highlight=False).print(table)
    return EXIT_OK
