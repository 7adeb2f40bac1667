"""``lepton broker init``: write a fleet's Mosquitto configuration, so no broker file is edited
by hand (see :mod:`lepton.coordinator.auth.broker_config` for what it writes)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lepton.common.errors import LeptonError
from lepton.coordinator.auth.broker_config import BrokerInit, write_broker_files
from lepton.coordinator.cli.client import CliError
from lepton.coordinator.cli.exitcodes import EXIT_OK, EXIT_USAGE


def add_commands(top: Any) -> None:
    """Mount ``broker init`` on the ``lepton`` parser's subcommands."""
    broker = top.add_parser("broker", help="the MQTT broker's configuration")
    sub = broker.add_subparsers(dest="broker_command", required=True, metavar="COMMAND")
    init = sub.add_parser(
        "init",
        help="write mosquitto.conf and the dynamic security plugin's accounts for a fleet",
        description="Writes DIR/mosquitto.conf, DIR/dynamic-security.json and"
        " DIR/<coordinator-user>.password (mode 0600; point the coordinator's"
        ' [mqtt] password_file at it, and set [mqtt] accounts = "dynsec").',
    )
    init.add_argument("--dir", required=True, help="where to write the files")
    init.add_argument("--fleet", required=True, help="the fleet's name (the coordinator's fleet)")
    init.add_argument("--coordinator-user", default="coordinator", help="its broker username")
    init.add_argument(
        "--port", type=int, default=1883, help="plain MQTT port (default 1883; 0: none, TLS only)"
    )
    init.add_argument(
        "--bind", default="127.0.0.1", help="address of the plain listener ('' for all)"
    )
    init.add_argument("--tls-port", type=int, help="add a TLS listener on this port")
    init.add_argument(
        "--tls-bind", default="", help="address of the TLS listener (default: every interface)"
    )
    init.add_argument("--cafile", default="", help="CA certificate (with --tls-port)")
    init.add_argument("--certfile", default="", help="broker certificate (with --tls-port)")
    init.add_argument("--keyfile", default="", help="broker key (with --tls-port)")
    init.add_argument("--plugin", default="", help="path of mosquitto_dynamic_security.so")
    init.add_argument("--run-as", default="", help="the user mosquitto switches to (`user`)")
    init.add_argument("--data-dir", help="persistence directory (default DIR/data)")
    init.add_argument("--force", action="store_true", help="replace existing files")
    init.add_argument(
        "--print-password", action="store_true", help="also print the coordinator's password"
    )
    init.set_defaults(handler=cmd_broker_init)


def cmd_broker_init(args: argparse.Namespace) -> int:
    try:
        init = BrokerInit(
            directory=Path(args.dir),
            fleet=args.fleet,
            coordinator_user=args.coordinator_user,
            port=args.port,
            bind=args.bind,
            tls_port=args.tls_port,
            tls_bind=args.tls_bind,
            cafile=args.cafile,
            certfile=args.certfile,
            keyfile=args.keyfile,
            plugin=args.plugin,
            run_as=args.run_as,
            data_dir=None if args.data_dir is None else Path(args.data_dir),
        )
    except (ValueError, LeptonError) as exc:  # LeptonError: TopicError, a bad name
        raise CliError(str(exc), EXIT_USAGE) from exc
    try:
        password = write_broker_files(init, force=args.force)
    except (FileExistsError, FileNotFoundError) as exc:
        raise CliError(str(exc), EXIT_USAGE) from exc
    out = sys.stdout
    out.write(f"wrote {init.conf_path}\n      {init.dynsec_path}\n      {init.password_path}\n")
    out.write(
        "coordinator config:\n  [mqtt]\n"
        f'  username = "{init.coordinator_user}"\n'
        f'  password_file = "{init.password_path.resolve()}"\n'
        '  accounts = "dynsec"\n'
    )
    if args.print_password:
        out.write(f"coordinator password (shown once): {password}\n")
    out.write(f"start the broker with: mosquitto -c {init.conf_path.resolve()}\n")
    return EXIT_OK
