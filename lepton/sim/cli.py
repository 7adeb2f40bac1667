"""``lepton-sim``: run a simulated fleet of virtual devices, each a real agent.

Installed with the ``demo`` extra's dependencies, beside ``lepton-demo``; devices and the cloud
VM use neither. The agent's command line (``lepton-agent``) knows nothing of it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from lepton.agent.enrol import EnrolError


async def _sim(ns: argparse.Namespace) -> None:
    from lepton.sim.enrol import Enrolment
    from lepton.sim.fleet import FleetSpec, build_devices, enrol_devices, run_fleet
    from lepton.sim.profiles import parse_mix
    from lepton.sim.updater import UpdateFail

    host = ns.host_gflops
    if host is None:
        from lepton.agent import __version__
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
        enrolment=(
            Enrolment(ns.enroll, ns.claim, concurrency=ns.enroll_concurrency, ca_file=ns.ca_file)
            if ns.enroll
            else None
        ),
        ca_file=ns.ca_file,
        release_root=ns.release_root,
        agent_version=ns.agent_version,
        update_fail=UpdateFail.parse(ns.update_fail) if ns.update_fail else None,
        trial_s=ns.trial_s,
    )
    await enrol_devices(spec)
    devices = build_devices(spec)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ns.duration is not None:
        loop.call_later(ns.duration, stop.set)
    await run_fleet(devices, stop)


def build_parser() -> argparse.ArgumentParser:
    sim = argparse.ArgumentParser(
        prog="lepton-sim",
        description="Run a simulated fleet of virtual devices (each a real agent).",
    )
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
    sim.add_argument(
        "--enroll",
        metavar="URL",
        default=None,
        help="the coordinator's URL: each device without an identity enrols there at start",
    )
    sim.add_argument(
        "--claim", default=None, help="a multi-use claim (lepton devices enroll --uses N)"
    )
    sim.add_argument("--enroll-concurrency", type=int, default=16)
    sim.add_argument(
        "--ca-file",
        type=Path,
        default=None,
        help="the fleet CA (PEM): enrolment verifies the coordinator with it, and each device"
        " its broker and the coordinator (default: the CA enrolment hands out)",
    )
    sim.add_argument(
        "--release-root",
        type=Path,
        default=None,
        help="the release trust root (root.json) every device pins; without it devices"
        " refuse install tasks",
    )
    sim.add_argument(
        "--agent-version", default=None, help="the version devices start on (default: this one)"
    )
    sim.add_argument(
        "--update-fail",
        metavar="SHARE:VERSION[,VERSION...]",
        default=None,
        help="this share of the devices (the same ones in every run) fail the health trial of"
        " these releases and roll back (a bundle with a SIM_CRASHES file fails everywhere)",
    )
    sim.add_argument(
        "--trial-s", type=float, default=1.0, help="how long a new version's health trial takes"
    )
    sim.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    sim.add_argument("--log-level", default="WARNING")
    return sim


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``lepton-sim``; returns the exit code."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    if bool(ns.enroll) != bool(ns.claim):
        parser.error("--enroll and --claim go together")
    logging.basicConfig(
        level=ns.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        asyncio.run(_sim(ns))
    except KeyboardInterrupt:
        return 130
    except ValueError as exc:
        print(f"lepton-sim: {exc}", file=sys.stderr)
        return 2
    except EnrolError as exc:
        print(f"lepton-sim: enrolment refused: {exc.reason}: {exc.detail}", file=sys.stderr)
        return 1
    return 0
