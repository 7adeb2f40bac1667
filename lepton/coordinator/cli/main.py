"""``lepton``: run the coordinator, and see and drive the fleet through its HTTP API.

Human tables by default, ``--json`` for scripts. The API address is ``--api URL`` or
``$LEPTON_API`` (default http://127.0.0.1:8080). Exit codes: 0 done, 1 error, 2 usage or
configuration error, 3 not found, 4 coordinator unreachable, 5 ``tasks submit --wait``: the
task failed, expired or was cancelled, 6 ``tasks cancel``: the task had already ended, 8 the
database is at another schema revision (``lepton db upgrade``).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec
from rich.console import Console

from lepton.coordinator.cli import render
from lepton.coordinator.cli.client import ApiClient, CliError, client_of, client_options
from lepton.coordinator.cli.exitcodes import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_SCHEMA,
    EXIT_TASK_FAILED,
    EXIT_TASK_FINISHED,
    EXIT_USAGE,
)
from lepton.coordinator.tasks.request import TaskRequest
from lepton.coordinator.tasks.states import TASK_STATES, TERMINAL
from lepton.protocol import routes

# `coordinator run` flags -> config keys (every other key: --set KEY=VALUE).
RUN_FLAGS = {
    "fleet": "fleet",
    "instance_id": "instance_id",
    "data_dir": "data_dir",
    "log_level": "log_level",
    "database_url": "database.url",
    "mqtt_host": "mqtt.host",
    "mqtt_port": "mqtt.port",
    "http_host": "http.host",
    "http_port": "http.port",
}


#: Command groups that live with their feature: name -> (module, help). Each module has
#: ``add_commands(top)``, which mounts the group and sets a ``handler`` on every command. A
#: group is imported only when it is named on the command line (the model registry loads
#: onnxruntime, which takes seconds); otherwise it is listed by name and help only.
COMMAND_GROUPS: dict[str, tuple[str, str]] = {
    "broker": ("lepton.coordinator.auth.broker_cli", "the MQTT broker's configuration"),
    "ca": ("lepton.coordinator.auth.ca_cli", "the fleet CA: create it, issue certificates"),
    "db": ("lepton.coordinator.cli.db", "the database's schema revision; upgrade it"),
    "tokens": ("lepton.coordinator.auth.cli", "operator API tokens: create, list, revoke"),
    "audit": ("lepton.coordinator.auth.cli_audit", "the audit log: who did what, when"),
    "fl": ("lepton.coordinator.fl.cli", "federated learning jobs"),
    "release": (
        "lepton.coordinator.releases.cli_keys",
        "release keys and trust roots; build, sign and verify agent images",
    ),
    "models": (
        "lepton.coordinator.model_registry.cli",
        "model registry: register, INT8 quantization through the gate, deploy",
    ),
    "rollout": (
        "lepton.coordinator.rollouts.cli",
        "staged rollouts of agent releases and models: create, watch, pause, approve, abort",
    ),
}


def build_parser(load: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser, with the command groups in ``load`` (default: all) mounted in
    full and the others listed by name."""
    p = argparse.ArgumentParser(prog="lepton", description="Lepton edge-AI fleet: coordinator CLI.")
    p.add_argument("--api", default=None, help="coordinator API URL (env LEPTON_API)")
    p.add_argument(
        "--token",
        default=None,
        help="operator token (env LEPTON_TOKEN, else the file `tokens create --save` writes)",
    )
    p.add_argument(
        "--ca-file",
        default=None,
        help="CA certificate to verify an https:// coordinator with (env LEPTON_CA_FILE)",
    )
    p.add_argument("--json", action="store_true", help="JSON output for scripts")
    p.add_argument("--timeout", type=float, default=10.0, help="HTTP timeout, seconds")
    top = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _coordinator_commands(top)
    _device_commands(top)
    _task_commands(top)
    wanted = set(COMMAND_GROUPS if load is None else load)
    for name, (module, help_text) in COMMAND_GROUPS.items():
        if name in wanted:
            try:
                importlib.import_module(module).add_commands(top)
                continue
            except ImportError:  # the group's extra dependencies are not installed
                pass
        top.add_parser(name, help=help_text)
    return p


def _coordinator_commands(top: Any) -> None:
    coord = top.add_parser("coordinator", help="run the coordinator service")
    csub = coord.add_subparsers(dest="coordinator_command", required=True, metavar="COMMAND")
    for name, help_text in (
        ("run", "run the coordinator until SIGTERM/SIGINT"),
        ("config", "print the effective configuration (secrets masked) and exit"),
    ):
        run = csub.add_parser(name, help=help_text)
        run.add_argument("--config", help="TOML file (env LEPTON_COORDINATOR_CONFIG)")
        for flag, key in RUN_FLAGS.items():
            run.add_argument(f"--{flag.replace('_', '-')}", dest=flag, help=f"sets {key}")
        run.add_argument(
            "--set",
            dest="settings",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="any config key, e.g. --set scheduler.batch_interval_s=0.5",
        )
        run.add_argument(
            "--insecure",
            action="store_true",
            help="no API authentication: every caller is an administrator (local experiments"
            " on a private machine only; logged loudly)",
        )
        run.set_defaults(handler=cmd_coordinator_run if name == "run" else cmd_coordinator_config)


def _device_commands(top: Any) -> None:
    devices = top.add_parser("devices", help="the fleet registry")
    dsub = devices.add_subparsers(dest="devices_command", required=True, metavar="COMMAND")
    ls = dsub.add_parser("ls", help="list devices")
    ls.add_argument("--state", choices=("online", "offline"))
    ls.add_argument("--limit", type=int, default=1000)
    client_options(ls)
    ls.set_defaults(handler=cmd_devices_ls)
    show = dsub.add_parser("show", help="one device in detail")
    show.add_argument("device_id", metavar="ID")
    client_options(show)
    show.set_defaults(handler=cmd_devices_show)
    # Imported here: lepton.coordinator.auth's CLI modules import this package.
    from lepton.coordinator.auth.cli_devices import add_device_commands

    add_device_commands(dsub)


def _task_commands(top: Any) -> None:
    tasks = top.add_parser("tasks", help="submit and inspect tasks")
    tsub = tasks.add_subparsers(dest="tasks_command", required=True, metavar="COMMAND")
    sub = tsub.add_parser("submit", help="submit a task")
    sub.add_argument("kind", metavar="KIND", help='e.g. "echo" or "benchmark"')
    sub.add_argument(
        "--param",
        "-p",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a task parameter; VALUE is parsed as JSON when it can be (numbers, lists...)",
    )
    sub.add_argument("--params-json", help="all parameters as one JSON object")
    sub.add_argument("--id", dest="task_id", help="task id (default: generated)")
    sub.add_argument("--demand", type=float, help="compute demand, GOP")
    sub.add_argument("--model-class", help="throughput class for the estimator")
    sub.add_argument("--precision", choices=("fp32", "int8"))
    sub.add_argument("--runtime", help="required runtime")
    sub.add_argument("--accelerator", help="required accelerator")
    sub.add_argument("--memory", type=int, help="memory needed, bytes")
    sub.add_argument("--device", help="pin to this device")
    sub.add_argument("--max-attempts", type=int)
    sub.add_argument("--expires-in", type=float, help="start deadline, seconds from now")
    sub.add_argument("--wait", action="store_true", help="wait until the task finishes")
    sub.add_argument("--wait-timeout", type=float, default=300.0)
    client_options(sub)
    sub.set_defaults(handler=cmd_tasks_submit)
    tls = tsub.add_parser("ls", help="list tasks, newest first")
    tls.add_argument("--state", choices=TASK_STATES)
    tls.add_argument("--device")
    tls.add_argument("--kind")
    tls.add_argument("--limit", type=int, default=50)
    client_options(tls)
    tls.set_defaults(handler=cmd_tasks_ls)
    cancel = tsub.add_parser(
        "cancel",
        help="cancel a task: a pending one at once, a running one on its device",
        description="Exit codes: 0 cancelled or cancel requested, 3 no such task,"
        " 6 the task had already ended.",
    )
    cancel.add_argument("task_id", metavar="ID")
    cancel.add_argument("--reason", help="why (kept with the task, sent to its device)")
    client_options(cancel)
    cancel.set_defaults(handler=cmd_tasks_cancel)
    for name, handler, help_text in (
        ("show", cmd_tasks_show, "one task with its attempts"),
        ("explain", cmd_tasks_explain, "why the task went where it went"),
    ):
        cmd = tsub.add_parser(name, help=help_text)
        cmd.add_argument("task_id", metavar="ID")
        client_options(cmd)
        cmd.set_defaults(handler=handler)


# ---------------------------------------------------------------- helpers


def _out(args: argparse.Namespace, data: Any, human: Any) -> None:
    if args.json:
        sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
    else:
        human()


def _client(args: argparse.Namespace) -> ApiClient:
    return client_of(args)


def _console() -> Console:
    return Console(highlight=False)


def parse_param(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise CliError(f"--param wants KEY=VALUE, got {text!r}", EXIT_USAGE)
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    return key, value


# ---------------------------------------------------------------- coordinator


def _load_config(args: argparse.Namespace) -> Any:
    from lepton.coordinator.config import load

    overrides: dict[str, Any] = {}
    flags: dict[str, str] = {}  # key -> the flag that set it, for errors
    for item in args.settings:
        key, sep, value = item.partition("=")
        if not sep:
            raise CliError(f"--set wants KEY=VALUE, got {item!r}", EXIT_USAGE)
        overrides[key.strip()] = value
        flags[key.strip()] = f"flag --set {key.strip()}"
    for flag, key in RUN_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            overrides[key] = value
            flags[key] = f"flag --{flag.replace('_', '-')}"
    if getattr(args, "insecure", False):
        overrides["auth.insecure"] = True
        flags["auth.insecure"] = "flag --insecure"
    return load(args.config, overrides=overrides, override_label=flags.__getitem__)


def cmd_coordinator_config(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    data = cfg.redacted()
    data["database_url"] = cfg.database_url
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return EXIT_OK


def cmd_coordinator_run(args: argparse.Namespace) -> int:
    from lepton.coordinator.service import serve

    cfg = _load_config(args)
    logging.basicConfig(
        level=getattr(logging, cfg.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    asyncio.run(serve(cfg))
    return EXIT_OK


# ---------------------------------------------------------------- devices


def cmd_devices_ls(args: argparse.Namespace) -> int:
    with _client(args) as api:
        devices = api.get(routes.DEVICES, state=args.state, limit=args.limit)
    _out(args, devices, lambda: _console().print(render.devices_table(devices)))
    return EXIT_OK


def cmd_devices_show(args: argparse.Namespace) -> int:
    with _client(args) as api:
        device = api.get(routes.path(routes.DEVICE, device_id=args.device_id))
    _out(args, device, lambda: render.print_device(_console(), device))
    return EXIT_OK


# ---------------------------------------------------------------- tasks


def _submission(args: argparse.Namespace) -> TaskRequest:
    params: dict[str, Any] = {}
    if args.params_json:
        try:
            loaded = json.loads(args.params_json)
        except ValueError as exc:
            raise CliError(f"--params-json is not JSON: {exc}", EXIT_USAGE) from exc
        if not isinstance(loaded, dict):
            raise CliError("--params-json must be a JSON object", EXIT_USAGE)
        params.update(loaded)
    params.update(parse_param(p) for p in args.param)
    given = {
        "kind": args.kind,
        "params": params,
        "id": args.task_id,
        "demand_gops": args.demand,
        "model_class": args.model_class,
        "precision": args.precision,
        "runtime": args.runtime,
        "accelerator": args.accelerator,
        "memory_bytes": args.memory,
        "device_id": args.device,
        "max_attempts": args.max_attempts,
        "expires_in_s": args.expires_in,
    }
    try:
        return msgspec.convert({k: v for k, v in given.items() if v is not None}, TaskRequest)
    except msgspec.ValidationError as exc:
        raise CliError(f"invalid task: {exc}") from exc


def cmd_tasks_submit(args: argparse.Namespace) -> int:
    request = _submission(args)
    with _client(args) as api:
        task = api.post(routes.TASKS, request.body())
        if args.wait:
            deadline = time.monotonic() + args.wait_timeout
            delay = 0.1
            while task["state"] not in TERMINAL:
                if time.monotonic() > deadline:
                    raise CliError(
                        f"task {task['id']} still {task['state']} after {args.wait_timeout:g}s"
                    )
                time.sleep(delay)
                delay = min(delay * 1.5, 2.0)
                task = api.get(routes.path(routes.TASK, task_id=task["id"]))
    if args.wait:
        _out(args, task, lambda: render.print_task(_console(), task))
        return EXIT_OK if task["state"] == "succeeded" else EXIT_TASK_FAILED
    _out(args, task, lambda: print(task["id"]))
    return EXIT_OK


def cmd_tasks_ls(args: argparse.Namespace) -> int:
    with _client(args) as api:
        tasks = api.get(
            routes.TASKS, state=args.state, device=args.device, kind=args.kind, limit=args.limit
        )
    _out(args, tasks, lambda: _console().print(render.tasks_table(tasks)))
    return EXIT_OK


def cmd_tasks_show(args: argparse.Namespace) -> int:
    with _client(args) as api:
        task = api.get(routes.path(routes.TASK, task_id=args.task_id))
    _out(args, task, lambda: render.print_task(_console(), task))
    return EXIT_OK


def cmd_tasks_cancel(args: argparse.Namespace) -> int:
    body = {} if args.reason is None else {"reason": args.reason}
    with _client(args) as api:
        task = api.post(
            routes.path(routes.TASK_CANCEL, task_id=args.task_id),
            body,
            codes={409: EXIT_TASK_FINISHED},
        )

    def human() -> None:
        if task["state"] == "cancelled":
            print(f"{task['id']} cancelled")
        else:
            print(f"{task['id']} {task['state']} on {task['device_id']}: cancel sent to it")

    _out(args, task, human)
    return EXIT_OK


def cmd_tasks_explain(args: argparse.Namespace) -> int:
    with _client(args) as api:
        body = api.get(routes.path(routes.TASK_EXPLAIN, task_id=args.task_id))
    _out(args, body, lambda: render.print_explanation(_console(), body))
    return EXIT_OK


# ---------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lepton``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(load=[a for a in argv if a in COMMAND_GROUPS])
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):  # a group whose dependencies are not installed
        parser.error(
            f"'{args.command}' needs the coordinator extra: pip install 'lepton-fleet[coordinator]'"
        )
    try:
        return int(args.handler(args))
    except CliError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return exc.code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        code = _known_failure(exc)
        if code is None:
            raise
        return code


def _known_failure(exc: Exception) -> int | None:
    """Print a one-line message for failures an operator can fix; None for bugs."""
    from sqlalchemy.exc import SQLAlchemyError

    from lepton.common.errors import ConfigError
    from lepton.coordinator.store.migrations import SchemaError

    if isinstance(exc, SchemaError):
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_SCHEMA
    if isinstance(exc, ConfigError):
        sys.stderr.write(f"configuration error: {exc}\n")
        return EXIT_USAGE
    if isinstance(exc, SQLAlchemyError):
        sys.stderr.write(f"error: database: {str(exc).splitlines()[0]}\n")
        return EXIT_ERROR
    if isinstance(exc, OSError):  # the HTTP port is taken, a file cannot be read...
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_ERROR
    return None
