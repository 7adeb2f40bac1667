"""``lepton release publish|ls|show``: publish signed bundles and read the release registry
through the coordinator's API.

- ``lepton release publish BUNDLE.tar``: stream the bundle to ``POST /v1/releases``; the
  coordinator verifies it against its trust root (a refusal prints its reason, exit 1);
- ``lepton release ls [--name NAME]``: every published release;
- ``lepton release show NAME VERSION``: its manifests and their files.

:func:`add_release_commands` mounts them on the ``release`` group's subparsers (the group
itself, with ``keys``, ``build``, ``sign`` and ``verify``, is
:mod:`lepton.coordinator.releases.cli_keys`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Final

from rich.console import Console
from rich.table import Table

from lepton.coordinator.cli.client import CliError, client_of, client_options
from lepton.coordinator.cli.exitcodes import EXIT_OK, EXIT_USAGE
from lepton.protocol import routes

#: A bundle may take a while to upload and verify: the read timeout of ``publish``.
PUBLISH_TIMEOUT_S: Final = 600.0


def add_release_commands(subparsers: Any) -> None:
    """Add ``publish``, ``ls`` and ``show`` to a group's ``add_subparsers()`` object."""
    publish = subparsers.add_parser(
        "publish", help="publish a signed bundle on the coordinator (scope rollouts:write)"
    )
    publish.add_argument("bundle", type=Path, metavar="BUNDLE.tar")
    client_options(publish)
    publish.set_defaults(handler=cmd_publish)
    ls = subparsers.add_parser("ls", help="published releases")
    ls.add_argument("--name", default=None, help="only this release")
    client_options(ls)
    ls.set_defaults(handler=cmd_ls)
    show = subparsers.add_parser("show", help="one release version: its manifests and files")
    show.add_argument("name")
    show.add_argument("version")
    client_options(show)
    show.set_defaults(handler=cmd_show)


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def cmd_publish(args: argparse.Namespace) -> int:
    path: Path = args.bundle
    if not path.is_file():
        raise CliError(f"{path}: no such file", EXIT_USAGE)
    args.timeout = max(getattr(args, "timeout", 10.0), PUBLISH_TIMEOUT_S)
    with client_of(args) as api, path.open("rb") as fh:
        answer = api.request(
            "POST",
            routes.RELEASES,
            content=fh,
            headers={
                "Content-Type": "application/x-tar",
                "Content-Length": str(path.stat().st_size),
            },
        )
    if args.json:
        _print_json(answer)
        return EXIT_OK
    for r in answer["releases"]:
        sys.stdout.write(
            f"{r['name']} {r['version']} ({r['kind']}, {', '.join(r['device_classes'])}):"
            f" manifest {r['manifest_digest']}\n"
        )
    return EXIT_OK


def cmd_ls(args: argparse.Namespace) -> int:
    with client_of(args) as api:
        answer = api.get(routes.RELEASES, name=args.name)
    if args.json:
        _print_json(answer)
        return EXIT_OK
    table = Table("name", "version", "kind", "classes", "floor", "files", "bytes", "manifest")
    for r in answer["releases"]:
        table.add_row(
            r["name"],
            r["version"],
            r["kind"],
            ", ".join(r["device_classes"]),
            r["security_floor"],
            str(r["file_count"]),
            str(r["total_bytes"]),
            r["manifest_digest"][:12],
        )
    Console(highlight=False).print(table)
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    with client_of(args) as api:
        answer = api.get(routes.path(routes.RELEASE, name=args.name, version=args.version))
    if args.json:
        _print_json(answer)
        return EXIT_OK
    console = Console(highlight=False)
    for m in answer["manifests"]:
        console.print(
            f"{m['name']} {m['version']} ({m['kind']}) for {', '.join(m['device_classes'])};"
            f" floor {m['security_floor']}; manifest {m['manifest_digest']}"
            f" ({m['manifest_size']} bytes); published by {m['published_by'] or '-'}"
        )
        # Plain lines: digests are copied from here whole, never cut to a terminal's width.
        for f in m["files"]:
            sys.stdout.write(f"  {f['sha256']}  {f['length']:>12}  {f['path']}\n")
    return EXIT_OK
