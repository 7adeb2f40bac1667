"""``lepton db``: the coordinator database's schema revision, and upgrading it.

The database is ``--database URL``, else the coordinator's configuration's (``--config``,
``$LEPTON_COORDINATOR_CONFIG``, ``LEPTON_*`` variables, ``--data-dir``): the database
``lepton coordinator run`` with the same options would open.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from lepton.coordinator.cli.exitcodes import EXIT_OK, EXIT_SCHEMA


def add_commands(top: Any) -> None:
    """Mount ``db upgrade|current`` on the ``lepton`` parser's subcommands."""
    db = top.add_parser("db", help="the database's schema revision; upgrade it")
    sub = db.add_subparsers(dest="db_command", required=True, metavar="COMMAND")
    for name, handler, help_text in (
        ("upgrade", cmd_db_upgrade, "bring the database to this release's schema"),
        ("current", cmd_db_current, "show the database's schema revision"),
    ):
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("--database", help="database URL (default: the configuration's)")
        cmd.add_argument("--config", help="TOML file (env LEPTON_COORDINATOR_CONFIG)")
        cmd.add_argument("--data-dir", help="sets data_dir (where the default SQLite file is)")
        cmd.add_argument(
            "--json", action="store_true", default=argparse.SUPPRESS, help="JSON output"
        )
        cmd.set_defaults(handler=handler)


def _database_url(args: argparse.Namespace) -> str:
    if args.database:
        return str(args.database)
    from lepton.coordinator.config import load

    overrides = {} if args.data_dir is None else {"data_dir": args.data_dir}
    return load(args.config, overrides=overrides).database_url


def _describe(revision: str | None, state: str, head: str) -> str:
    if state == "empty":
        return f"empty (no tables; start-up or `lepton db upgrade` makes them at {head})"
    if state == "unversioned":
        return f"unversioned (made by a release before migrations; `lepton db upgrade` to {head})"
    if state == "current":
        return f"{revision} (head)"
    if state == "behind":
        return f"{revision} (this release runs {head}: `lepton db upgrade`)"
    return f"{revision} (unknown to this release, which runs {head}: the database is newer)"


def cmd_db_current(args: argparse.Namespace) -> int:
    from lepton.coordinator.store import migrations
    from lepton.coordinator.store.connection import make_engines

    engines = make_engines(_database_url(args))
    try:
        st = migrations.current(engines.read)
    finally:
        engines.dispose()
    if args.json:
        sys.stdout.write(
            json.dumps({"state": st.state, "revision": st.revision, "head": st.head}) + "\n"
        )
    else:
        print(_describe(st.revision, st.state, st.head))
    return EXIT_OK if st.state == "current" else EXIT_SCHEMA


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from lepton.coordinator.store import migrations
    from lepton.coordinator.store.connection import make_engines

    engines = make_engines(_database_url(args))
    try:
        before, after = migrations.upgrade(engines.write)
    finally:
        engines.dispose()
    if args.json:
        sys.stdout.write(
            json.dumps({"from": before.revision, "from_state": before.state, "to": after.revision})
            + "\n"
        )
    elif before.state == "current":
        print(f"already at {after.revision} (head)")
    else:
        print(f"upgraded from {before.revision or before.state} to {after.revision} (head)")
    return EXIT_OK
