"""``lepton ca``: the fleet CA on this machine (see :mod:`lepton.coordinator.auth.pki`).

``init`` makes ``ca.crt``/``ca.key`` and a server certificate (``server.crt``, followed by the
CA's, and ``server.key``) for the broker and the API; ``issue-server`` and ``issue-client``
make more; ``sign-csr`` signs a device's CSR by hand; ``fingerprint`` prints what devices pin
at enrolment.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from pathlib import Path
from typing import Any

from lepton.coordinator.auth import cafiles
from lepton.coordinator.auth.pki import (
    CA_DAYS,
    MAX_DEVICE_DAYS,
    MAX_SERVER_DAYS,
    FleetCA,
    PkiError,
)
from lepton.coordinator.cli.client import CliError
from lepton.coordinator.cli.exitcodes import EXIT_ERROR, EXIT_OK


def default_sans() -> list[str]:
    """localhost, 127.0.0.1 and this host's name."""
    names = ["localhost", "127.0.0.1"]
    host = socket.gethostname()
    if host and host not in names:
        names.append(host)
    return names


def add_commands(top: Any) -> None:
    """Mount ``ca init|issue-server|issue-client|sign-csr|fingerprint``."""
    ca = top.add_parser("ca", help="the fleet CA: create it, issue certificates")
    sub = ca.add_subparsers(dest="ca_command", required=True, metavar="COMMAND")

    def command(name: str, handler: Any, help_text: str) -> argparse.ArgumentParser:
        cmd: argparse.ArgumentParser = sub.add_parser(name, help=help_text)
        cmd.add_argument("--dir", required=True, type=Path, help="the CA's directory")
        cmd.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
        cmd.set_defaults(handler=handler)
        return cmd

    init = command("init", cmd_init, "create the fleet CA and a server certificate")
    init.add_argument("--name", default="Lepton fleet CA", help="the CA's common name")
    init.add_argument("--days", type=int, default=CA_DAYS, help="the CA's lifetime")
    init.add_argument("--force", action="store_true", help="replace an existing CA")
    _san_option(init, required=False)
    server = command("issue-server", cmd_issue_server, "a server certificate from the CA")
    _san_option(server, required=True)
    server.add_argument("--out", default="server", help="file stem (default: server)")
    server.add_argument("--days", type=int, default=MAX_SERVER_DAYS)
    client = command("issue-client", cmd_issue_client, "a client certificate (CN=IDENTITY)")
    client.add_argument("--identity", required=True, help="the CN, the broker username")
    client.add_argument("--out", help="file stem (default: the identity)")
    client.add_argument("--days", type=int, default=MAX_DEVICE_DAYS)
    csr = command("sign-csr", cmd_sign_csr, "sign a device's CSR (CN must be the device id)")
    csr.add_argument("--device", required=True, help="the device id")
    csr.add_argument("--csr", required=True, type=Path, help="the CSR, PEM")
    csr.add_argument("--out", required=True, type=Path, help="where the certificate goes")
    csr.add_argument("--days", type=int, default=365)
    command("fingerprint", cmd_fingerprint, "the CA's sha256 fingerprint (for enrolment)")


def _san_option(cmd: argparse.ArgumentParser, *, required: bool) -> None:
    cmd.add_argument(
        "--san",
        action="append",
        required=required,
        metavar="HOST-OR-IP",
        help="a name clients use to reach the server (repeat)"
        + ("" if required else "; default: localhost, 127.0.0.1 and the host name"),
    )


def _report(args: argparse.Namespace, data: dict[str, Any], lines: list[str]) -> None:
    if getattr(args, "json", False):
        sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
    else:
        sys.stdout.write("\n".join(lines) + "\n")


def _pki(call: Any, *a: Any, **kw: Any) -> Any:
    try:
        return call(*a, **kw)
    except PkiError as exc:
        raise CliError(str(exc), EXIT_ERROR) from exc


def cmd_init(args: argparse.Namespace) -> int:
    directory: Path = args.dir
    if cafiles.has_ca(directory) and not args.force:
        raise CliError(f"{directory} already holds a CA; --force replaces it", EXIT_ERROR)
    sans = args.san or default_sans()
    ca = _pki(FleetCA.create, args.name, days=args.days)
    issued = _pki(ca.issue_server, sans)
    _pki(cafiles.save_ca, directory, ca, force=args.force)
    # The server presents the CA after its own certificate, so a device that pins the CA
    # (`lepton-agent enroll --ca-sha256`) finds it in the chain it is shown.
    cert, key = cafiles.save_issued(directory, "server", issued, chain=ca.cert_pem)
    _report(
        args,
        {
            "fingerprint": ca.fingerprint,
            "ca": str(directory / cafiles.CA_CERT),
            "server_cert": str(cert),
            "server_key": str(key),
            "sans": sans,
        },
        [
            f"CA {args.name!r} in {directory}",
            f"server certificate for {', '.join(sans)}: {cert}",
            f"fingerprint {ca.fingerprint}",
        ],
    )
    return EXIT_OK


def cmd_issue_server(args: argparse.Namespace) -> int:
    ca = _pki(cafiles.load_ca, args.dir)
    issued = _pki(ca.issue_server, args.san, days=args.days)
    cert, key = cafiles.save_issued(args.dir, args.out, issued, chain=ca.cert_pem)
    _report(args, {"cert": str(cert), "key": str(key), "sans": args.san}, [f"{cert}", f"{key}"])
    return EXIT_OK


def cmd_issue_client(args: argparse.Namespace) -> int:
    ca = _pki(cafiles.load_ca, args.dir)
    issued = _pki(ca.issue_client, args.identity, days=args.days)
    try:
        cert, key = cafiles.save_issued(args.dir, args.out or args.identity, issued)
    except ValueError as exc:
        raise CliError(str(exc), EXIT_ERROR) from exc
    _report(args, {"cert": str(cert), "key": str(key)}, [f"{cert}", f"{key}"])
    return EXIT_OK


def cmd_sign_csr(args: argparse.Namespace) -> int:
    ca = _pki(cafiles.load_ca, args.dir)
    try:
        csr = args.csr.read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {args.csr}: {exc}", EXIT_ERROR) from exc
    cert = _pki(ca.sign_device_csr, csr, args.device, args.days)
    cafiles.write_file(args.out, cert, 0o644)
    _report(args, {"cert": str(args.out)}, [str(args.out)])
    return EXIT_OK


def cmd_fingerprint(args: argparse.Namespace) -> int:
    ca = _pki(cafiles.load_ca, args.dir)
    _report(args, {"fingerprint": ca.fingerprint}, [ca.fingerprint])
    return EXIT_OK
