"""``lepton tokens create|ls|revoke``: operator API tokens, on the coordinator host.

These commands work on the coordinator's database directly (``--database URL``, else the
configuration's, as ``lepton db`` does): whoever can read the coordinator's configuration
and database is already its administrator, and the first token has to come from somewhere.
A token is shown once, when it is made; the database keeps only its SHA-256.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from typing import Any

from lepton.coordinator.auth import credentials
from lepton.coordinator.auth.scopes import DEFAULT, DESCRIPTIONS, Scope, parse
from lepton.coordinator.cli.client import CliError, save_token
from lepton.coordinator.cli.exitcodes import EXIT_OK, EXIT_USAGE

NAME_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def add_commands(top: Any) -> None:
    """Mount ``tokens create|ls|revoke``."""
    tokens = top.add_parser("tokens", help="operator API tokens: create, list, revoke")
    sub = tokens.add_subparsers(dest="tokens_command", required=True, metavar="COMMAND")
    scopes = "; ".join(f"{s.value}: {d}" for s, d in DESCRIPTIONS.items())
    create = sub.add_parser(
        "create",
        help="make a token (shown once)",
        description=f"Scopes: {scopes}. Default: {', '.join(sorted(DEFAULT))}.",
    )
    create.add_argument(
        "name", metavar="NAME", help="unique; how ls, revoke and the audit log name it"
    )
    create.add_argument(
        "--scope", action="append", default=[], help="repeatable (default: the everyday set)"
    )
    create.add_argument("--expires-in", help="e.g. 90d, 12h (default: no expiry)")
    create.add_argument(
        "--save", action="store_true", help="also write it where the CLI looks for it (0600)"
    )
    create.set_defaults(handler=cmd_create)
    ls = sub.add_parser("ls", help="list tokens (never their secrets)")
    ls.set_defaults(handler=cmd_ls)
    revoke = sub.add_parser("revoke", help="revoke a token by name (at once, on every replica)")
    revoke.add_argument("name", metavar="NAME")
    revoke.set_defaults(handler=cmd_revoke)
    for cmd in (create, ls, revoke):
        database_options(cmd)


def database_options(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--database", help="database URL (default: the configuration's)")
    cmd.add_argument("--config", help="TOML file (env LEPTON_COORDINATOR_CONFIG)")
    cmd.add_argument("--data-dir", help="sets data_dir (where the default SQLite file is)")
    cmd.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="JSON output")


def open_auth_store(args: argparse.Namespace) -> Any:
    """The auth tables of the database the arguments name (schema made or checked first)."""
    from lepton.coordinator.auth.store import AuthStore
    from lepton.coordinator.cli.db import _database_url
    from lepton.coordinator.store import Store

    store = Store.open(_database_url(args))
    return store, AuthStore(store.engine)


def parse_duration(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if m is None:
        raise CliError(f"want a duration like 30d, 12h or 900s, got {text!r}", EXIT_USAGE)
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def cmd_create(args: argparse.Namespace) -> int:
    if not NAME_RE.match(args.name):
        raise CliError("NAME: 1-64 letters, digits, '.', '_', '-'", EXIT_USAGE)
    try:
        scopes = parse(args.scope) if args.scope else DEFAULT
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from exc
    now = time.time()
    expires = now + parse_duration(args.expires_in) if args.expires_in else None
    token = credentials.new("operator")
    from lepton.coordinator.errors import ConflictError

    store, auth = open_auth_store(args)
    try:
        try:
            record = auth.create_token(
                args.name,
                credentials.digest(token),
                scopes,
                created_by="cli",
                expires_at=expires,
                now=now,
            )
        except ConflictError as exc:
            raise CliError(
                f"a token named {args.name!r} exists (names stay taken after revoke:"
                " the audit log names tokens by them); choose another name",
                EXIT_USAGE,
            ) from exc
        auth.audit("cli", "tokens create", args.name, "ok", detail={"scopes": sorted(scopes)})
    finally:
        store.close()
    saved = save_token(token) if args.save else None
    if getattr(args, "json", False):
        out = {**record.to_dict(now), "token": token, "saved_to": str(saved) if saved else None}
        sys.stdout.write(json.dumps(out, indent=2) + "\n")
    else:
        print(token)
        where = f"; saved to {saved}" if saved else ""
        sys.stderr.write(
            f"token {args.name!r} ({', '.join(record.scopes)}): shown once, keep it safe{where}\n"
        )
    return EXIT_OK


def cmd_ls(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from lepton.coordinator.cli.render import ago

    store, auth = open_auth_store(args)
    try:
        records = auth.list_tokens()
    finally:
        store.close()
    now = time.time()
    if getattr(args, "json", False):
        sys.stdout.write(json.dumps([r.to_dict(now) for r in records], indent=2) + "\n")
        return EXIT_OK
    table = Table("name", "state", "scopes", "created", "expires", "last used")
    for r in records:
        expires = (
            "never"
            if r.expires_at is None
            else time.strftime("%Y-%m-%d %H:%M", time.localtime(r.expires_at))
        )
        table.add_row(
            r.name,
            r.state(now),
            ", ".join(r.scopes),
            ago(r.created_at, now),
            expires,
            ago(r.last_used_at, now) if r.last_used_at else "never",
        )
    Console(highlight=False).print(table)
    return EXIT_OK


def cmd_revoke(args: argparse.Namespace) -> int:
    from lepton.coordinator.errors import NotFoundError

    store, auth = open_auth_store(args)
    try:
        try:
            record = auth.revoke_token(args.name)
        except NotFoundError as exc:
            from lepton.coordinator.cli.exitcodes import EXIT_NOT_FOUND

            raise CliError(f"no token named {args.name!r}", EXIT_NOT_FOUND) from exc
        auth.audit("cli", "tokens revoke", args.name, "ok")
    finally:
        store.close()
    if getattr(args, "json", False):
        sys.stdout.write(json.dumps(record.to_dict(time.time()), indent=2) + "\n")
    else:
        print(f"token {args.name!r} revoked")
    return EXIT_OK


__all__ = ["Scope", "add_commands"]
