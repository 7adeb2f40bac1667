"""``lepton-agent``: run the daemon, enrol the device, probe it, print the version."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

from lepton.agent import __version__, enrol_cmd
from lepton.agent.config import AgentConfig, cli_options, load_config
from lepton.agent.update import cli as update_cli
from lepton.common.errors import ConfigError


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "configuration (each also LEPTON_<NAME> and TOML [section] key)"
    )
    for flag, name, hint in cli_options():
        hint = _base(hint)  # noqa: PLW2901
        kwargs: dict[str, Any] = {"dest": name, "default": None}
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(hint) is Literal:
            kwargs["choices"] = typing.get_args(hint)
        else:
            kwargs["metavar"] = name.rpartition(".")[2].upper()
        group.add_argument(flag, **kwargs)


def _base(hint: Any) -> Any:
    """The type under ``Annotated`` bounds and ``Optional``."""
    while True:
        if typing.get_origin(hint) is typing.Annotated:
            hint = typing.get_args(hint)[0]
        elif isinstance(hint, types.UnionType):
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        else:
            return hint


def _config(ns: argparse.Namespace) -> AgentConfig:
    overrides = {
        name: getattr(ns, name)
        for _, name, _ in cli_options()
        if getattr(ns, name, None) is not None
    }
    return load_config(ns.config, overrides=overrides)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


async def _run(config: AgentConfig) -> int:
    from lepton.agent.daemon import Agent

    async with Agent(config) as agent:
        await agent.run(install_signal_handlers=True)
    # Non-zero after a failed trial or for a new image: the supervisor starts it again.
    return agent.exit_code


async def _probe(state_dir: Path, refresh: bool) -> dict[str, Any]:
    from lepton.agent.telemetry.probe import load_probe

    result = await load_probe(state_dir, agent_version=__version__, refresh=refresh)
    import msgspec

    return {
        "bench": msgspec.to_builtins(result.bench) if result.bench else None,
        "runtimes": list(result.runtimes),
        "accelerators": list(result.accelerators),
        "details": result.details,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lepton-agent", description="Lepton edge device agent")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the agent daemon (systemd: Type=notify)")
    run.add_argument(
        "--config", type=Path, default=None, help="TOML file (default /etc/lepton/agent.toml)"
    )
    _add_config_flags(run)
    probe = sub.add_parser(
        "probe", help="measure this device and print what the agent would report"
    )
    probe.add_argument("--config", type=Path, default=None)
    probe.add_argument("--refresh", action="store_true", help="ignore the cached figures")
    probe.add_argument("--agent-state-dir", dest="agent.state_dir", default=None)
    enrol_cmd.add_parser(sub)
    update_cli.add_parser(sub)
    sub.add_parser("version", help="print the agent version")
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    if ns.command == "version":
        print(__version__)
        return 0
    if ns.command in ("enroll", "update"):
        return enrol_cmd.run(ns) if ns.command == "enroll" else update_cli.run(ns)
    try:
        if ns.command == "probe":
            overrides = {"agent.state_dir": getattr(ns, "agent.state_dir")}
            config = load_config(ns.config, overrides=overrides)
            _setup_logging("WARNING")
            print(json.dumps(asyncio.run(_probe(config.agent.state_dir, ns.refresh)), indent=2))
            return 0
        config = _config(ns)
    except ConfigError as exc:
        print(f"lepton-agent: configuration error: {exc}", file=sys.stderr)
        return 2
    _setup_logging(config.agent.log_level)
    try:
        return asyncio.run(_run(config))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
