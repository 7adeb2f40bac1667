"""``lepton devices enroll|claims|unclaim|revoke``: enrolment claims and revocation, through
the API with the operator's token (scope ``devices:write``).

``enroll`` prints each claim once, with the command to run on the device it is for::

    lepton-agent enroll https://coordinator.example:8080 lpc_... [--ca-sha256 sha256:<hex>]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from typing import Any

from lepton.coordinator.auth.cli import parse_duration
from lepton.coordinator.cli.client import CliError, client_of, client_options
from lepton.coordinator.cli.exitcodes import EXIT_OK, EXIT_USAGE
from lepton.protocol import routes


def add_device_commands(dsub: Any) -> None:
    """Mount the enrolment commands under ``lepton devices``."""
    enroll = dsub.add_parser(
        "enroll",
        help="make enrolment claims (shown once) and print the command for each device",
    )
    enroll.add_argument("--count", type=int, default=1, help="how many claims (1-1000)")
    enroll.add_argument("--uses", type=int, default=1, help="enrolments per claim (default 1)")
    enroll.add_argument("--expires-in", default="24h", help="e.g. 24h, 7d (at most 30d)")
    enroll.add_argument("--class", dest="device_class", help="bind the devices to this class")
    enroll.add_argument("--group", dest="device_group", help="put the devices in this group")
    client_options(enroll)
    enroll.set_defaults(handler=cmd_enroll)
    claims = dsub.add_parser("claims", help="list enrolment claims (never their secrets)")
    client_options(claims)
    claims.set_defaults(handler=cmd_claims)
    unclaim = dsub.add_parser("unclaim", help="revoke an enrolment claim by name")
    unclaim.add_argument("name", metavar="NAME")
    client_options(unclaim)
    unclaim.set_defaults(handler=cmd_unclaim)
    revoke = dsub.add_parser(
        "revoke",
        help="revoke a device: its token, broker account and tasks, at once",
    )
    revoke.add_argument("device_id", metavar="ID")
    revoke.add_argument("--reason", default="", help="why (kept in the audit log)")
    client_options(revoke)
    revoke.set_defaults(handler=cmd_revoke)


def agent_command(url: str, token: str, ca_sha256: str | None) -> str:
    """What the operator runs on the device."""
    words = ["lepton-agent", "enroll", url, token]
    if ca_sha256:
        words += ["--ca-sha256", ca_sha256]
    return shlex.join(words)


def cmd_enroll(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {
        "count": args.count,
        "uses": args.uses,
        "expires_in_s": parse_duration(args.expires_in),
    }
    if not 1 <= args.count <= 1000 or not 1 <= args.uses <= 100_000:
        raise CliError("--count must be 1-1000 and --uses 1-100000", EXIT_USAGE)
    for key in ("device_class", "device_group"):
        if getattr(args, key):
            body[key] = getattr(args, key)
    with client_of(args) as api:
        made = api.post(routes.CLAIMS, body)
    url, ca = made["coordinator_url"], made.get("ca_sha256")
    for claim in made["claims"]:
        claim["command"] = agent_command(url, claim["token"], ca)
    if getattr(args, "json", False):
        sys.stdout.write(json.dumps(made, indent=2, sort_keys=True) + "\n")
        return EXIT_OK
    out = sys.stdout
    first = made["claims"][0]
    out.write(
        f"{len(made['claims'])} claim(s), {first['max_uses']} use(s) each, expiring"
        f" {time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(first['expires_at']))}."
        " Shown once: run each command on its device.\n"
    )
    for claim in made["claims"]:
        out.write(f"\n{claim['name']}: {claim['token']}\n  {claim['command']}\n")
    return EXIT_OK


def cmd_claims(args: argparse.Namespace) -> int:
    with client_of(args) as api:
        claims = api.get(routes.CLAIMS)
    if getattr(args, "json", False):
        sys.stdout.write(json.dumps(claims, indent=2, sort_keys=True) + "\n")
        return EXIT_OK
    for c in claims:
        bound = ", ".join(
            f"{k}={c[k]}" for k in ("device_class", "device_group") if c.get(k) is not None
        )
        sys.stdout.write(
            f"{c['name']}  {c['state']:<13} {c['uses']}/{c['max_uses']} used"
            f"  expires {time.strftime('%Y-%m-%d %H:%M', time.localtime(c['expires_at']))}"
            f"  {bound}\n"
        )
    return EXIT_OK


def cmd_unclaim(args: argparse.Namespace) -> int:
    with client_of(args) as api:
        claim = api.request("DELETE", routes.path(routes.CLAIM, name=args.name))
    sys.stdout.write(f"claim {claim['name']} revoked\n")
    return EXIT_OK


def cmd_revoke(args: argparse.Namespace) -> int:
    with client_of(args) as api:
        done = api.post(
            routes.path(routes.DEVICE_REVOKE, device_id=args.device_id), {"reason": args.reason}
        )
    if getattr(args, "json", False):
        sys.stdout.write(json.dumps(done, indent=2, sort_keys=True) + "\n")
        return EXIT_OK
    sys.stdout.write(
        f"device {done['device_id']} revoked; {len(done['requeued'])} task(s) requeued\n"
    )
    if not done["broker_account_removed"]:
        sys.stdout.write(
            f"WARNING: its broker account was not removed ({done['broker_error']});"
            " run the command again once the broker answers\n"
        )
        return 1
    return EXIT_OK
