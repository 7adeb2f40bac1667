"""``lepton-agent``: run the daemon, probe the device, print the version."""

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

from lepton.agent import __version__
from lepton.agent.config import AgentConfig, cli_options, load_config
from lepton.protocol.errors import ConfigError


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "configuration (each also LEPTON_<NAME> and TOML [section] key)"
    )
    for flag, name, hint in cli_options():
        if isinstance(hint, types.UnionType):
            hint = next(a for a in typing.get_args(hint) if a is not type(None))  # noqa: PLW2901
        kwargs: dict[str, Any] = {"dest": name, "default": None}
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(hint) is Literal:
            kwargs["choices"] = typing.get_args(hint)
        else:
            kwargs["metavar"] = name.split("_", 1)[1].upper()
        group.add_argument(flag, **kwargs)


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


async def _run(config: AgentConfig) -> None:
    from lepton.agent.daemon import Agent

    async with Agent(config) as agent:
        await agent.run(install_signal_handlers=True)


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


async def _sim(ns: argparse.Namespace) -> None:
    import signal

    from lepton.sim.fleet import FleetSpec, build_devices, run_fleet
    from lepton.sim.profiles import parse_mix

    host = ns.host_gflops
    if host is None:
        from lepton.agent.telemetry.probe import load_probe

        probe = await load_probe(ns.state_root, agent_version=__version__)
        host = probe.bench.fp32_gflops if probe.bench else 50.0
    spec = FleetSpec(
        devices=ns.devices,
        state_root=ns.state_root,
        mix=parse_mix(ns.profile_mix),
        broker_host=ns.broker_host,
        broker_port=ns.broker_port,
        fleet=ns.fleet,
        seed=ns.seed,
        data=ns.data,
        alpha=ns.alpha,
        capacity_interval=ns.capacity_interval,
        keepalive=ns.keepalive,
        flaky_per_min=ns.flaky,
        crash_per_min=ns.crash,
        host_gflops=host,
        id_prefix=ns.id_prefix,
        first_index=ns.first_index,
    )
    devices = build_devices(spec)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ns.duration is not None:
        loop.call_later(ns.duration, stop.set)
    await run_fleet(devices, stop)


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
    probe.add_argument("--agent-state-dir", dest="agent_state_dir", default=None)
    sub.add_parser("version", help="print the agent version")
    sim = sub.add_parser("sim", help="run a simulated fleet of virtual devices (each a real agent)")
    sim.add_argument("--devices", type=int, default=20)
    sim.add_argument(
        "--profile-mix",
        default="rpi4=0.4,rpi5=0.3,jetson-orin-nano=0.1,x86-gateway=0.2",
        help="profile=weight,... (profiles: rpi4, rpi5, jetson-orin-nano, x86-gateway)",
    )
    sim.add_argument("--broker-host", default="127.0.0.1")
    sim.add_argument("--broker-port", type=int, default=1883)
    sim.add_argument("--fleet", default="default")
    sim.add_argument("--state-root", type=Path, required=True, help="one sub-directory per device")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--data", choices=["digits"], default=None, help="give each device local data")
    sim.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label skew of --data")
    sim.add_argument("--capacity-interval", type=float, default=5.0)
    sim.add_argument("--keepalive", type=int, default=30)
    sim.add_argument("--flaky", type=float, default=0.0, help="link drops per device-minute")
    sim.add_argument("--crash", type=float, default=0.0, help="crashes per device-minute")
    sim.add_argument(
        "--host-gflops",
        type=float,
        default=None,
        help="this host's fp32 speed (default: measured by the probe)",
    )
    sim.add_argument("--id-prefix", default="sim")
    sim.add_argument("--first-index", type=int, default=0)
    sim.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    sim.add_argument("--log-level", default="WARNING")
    return parser


def main(argv: list[str] | None = None) -> int:  # noqa: PLR0911 (one exit code per outcome)
    ns = build_parser().parse_args(argv)
    if ns.command == "version":
        print(__version__)
        return 0
    if ns.command == "sim":
        _setup_logging(ns.log_level)
        try:
            asyncio.run(_sim(ns))
        except KeyboardInterrupt:
            return 130
        except ValueError as exc:
            print(f"lepton-agent sim: {exc}", file=sys.stderr)
            return 2
        return 0
    try:
        if ns.command == "probe":
            overrides = {"agent_state_dir": ns.agent_state_dir} if ns.agent_state_dir else {}
            config = load_config(ns.config, overrides=overrides)
            _setup_logging("WARNING")
            print(json.dumps(asyncio.run(_probe(config.state_dir, ns.refresh)), indent=2))
            return 0
        config = _config(ns)
    except ConfigError as exc:
        print(f"lepton-agent: configuration error: {exc}", file=sys.stderr)
        return 2
    _setup_logging(config.agent_log_level)
    try:
        asyncio.run(_run(config))
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
