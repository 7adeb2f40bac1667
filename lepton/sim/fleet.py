"""A simulated fleet: N virtual devices against any broker/coordinator, in one process.

Each device gets its own state directory (outbox, model cache) and, with ``data="digits"``, its
own partition of sklearn's digits dataset (Dirichlet label skew), registered as the data
source ``digits``; a shared held-out test set is registered as ``digits-test``. With
``adversarial=n``, ``n`` devices (chosen by the seed) send poisoned federated updates
(:mod:`lepton.sim.attacks`) instead of honest ones, and with ``forged_examples`` their train
results claim that many examples.
"""

from __future__ import annotations

import asyncio
import logging
import random
import resource
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lepton.agent import __version__
from lepton.agent.config import AgentConfig, load_config
from lepton.agent.identity import identity_path
from lepton.sim.device import VirtualDevice
from lepton.sim.enrol import Device, Enrolment, enrol_fleet
from lepton.sim.profiles import DEFAULT_MIX, Profile, assign_profiles
from lepton.sim.updater import SimulatedUpdater, UpdateFail

if TYPE_CHECKING:
    from lepton.agent.handlers import UpdateTransform

log = logging.getLogger(__name__)

# The host speed work is measured at (fp32 GFLOP/s); the start-up probe replaces it when it runs.
DEFAULT_HOST_GFLOPS = 50.0


@dataclass(frozen=True, slots=True, kw_only=True)
class FleetSpec:
    """Everything needed to build a simulated fleet."""

    devices: int
    state_root: Path
    mix: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    broker_host: str = "127.0.0.1"
    broker_port: int = 1883
    fleet: str = "default"
    seed: int = 0
    data: str | None = None
    alpha: float = 0.5
    capacity_interval: float = 5.0
    keepalive: int = 30
    flaky_per_min: float = 0.0
    crash_per_min: float = 0.0
    host_gflops: float = DEFAULT_HOST_GFLOPS
    id_prefix: str = "sim"
    first_index: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)
    # Virtual devices fetch from the coordinator on this host, whichever port it listens on.
    fetch_origins: tuple[str, ...] = ("http://127.0.0.1:*", "http://localhost:*")
    adversarial: int = 0
    attack: str = "sign_flip"
    attack_scale: float = 10.0
    forged_examples: int | None = None
    # Each device enrols with this (multi-use) claim before it starts, unless it has an
    # identity already; its identity then gives its fleet and broker (see enrol_devices).
    enrolment: Enrolment | None = None
    # The fleet CA each device verifies its broker (TLS) and the coordinator (HTTPS) with;
    # None: the one in its identity (enrolment hands it out), else the system's.
    ca_file: Path | None = None
    # Agent images (lepton.sim.updater): the release trust root every device pins (None: the
    # devices have no updater and refuse install tasks), the version they start on (None:
    # this agent's), which devices fail which releases' health trial, and how long a trial
    # takes.
    release_root: Path | None = None
    agent_version: str | None = None
    update_fail: UpdateFail | None = None
    trial_s: float = 1.0


def _raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def write_digits_partitions(spec: FleetSpec, device_ids: list[str]) -> dict[str, dict[str, str]]:
    """Per device: data source name -> path of its partition (and the shared test set)."""
    from lepton.models.data import digits_splits, dirichlet_partition, write_partition

    splits = digits_splits(seed=spec.seed)
    parts = dirichlet_partition(splits.train.y, len(device_ids), spec.alpha, spec.seed, min_size=8)
    test_path = write_partition(
        spec.state_root / "digits-test.npz", splits.test, range(len(splits.test))
    )
    out: dict[str, dict[str, str]] = {}
    for device_id, idx in zip(device_ids, parts, strict=True):
        path = write_partition(
            spec.state_root / device_id / "data" / "digits.npz", splits.train, idx
        )
        out[device_id] = {"digits": str(path), "digits-test": str(test_path)}
    return out


def device_ids(spec: FleetSpec) -> tuple[list[str], list[Profile]]:
    """The fleet's device ids and their profiles (the same for the same spec)."""
    profiles: list[Profile] = assign_profiles(spec.devices, spec.mix, spec.seed)
    ids = [f"{spec.id_prefix}-{p.name}-{spec.first_index + i:04d}" for i, p in enumerate(profiles)]
    return ids, profiles


async def enrol_devices(spec: FleetSpec) -> int:
    """Enrol the devices of ``spec`` that have no identity yet (``spec.enrolment`` set);
    returns how many enrolled. Call before :func:`build_devices`."""
    if spec.enrolment is None:
        return 0
    ids, profiles = device_ids(spec)
    devices = [Device(i, spec.state_root / i, p.name) for i, p in zip(ids, profiles, strict=True)]
    return await enrol_fleet(spec.enrolment, devices)


def build_devices(spec: FleetSpec) -> list[VirtualDevice]:
    """Configs, data and profiles for every device of the fleet."""
    ids, profiles = device_ids(spec)
    if spec.enrolment is not None:
        missing = [i for i in ids if not identity_path(spec.state_root / i).exists()]
        if missing:
            raise ValueError(f"{len(missing)} devices are not enrolled: run enrol_devices first")
    data = write_digits_partitions(spec, ids) if spec.data == "digits" else {}
    if spec.data not in (None, "digits"):
        raise ValueError(f"unknown simulated data set {spec.data!r} (known: digits)")
    _raise_fd_limit(8 * spec.devices + 256)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sim-outbox")
    rng = random.Random(spec.seed)
    if not 0 <= spec.adversarial <= len(ids):
        raise ValueError(f"adversarial must be in [0, {len(ids)}]")
    hostile = set(random.Random(spec.seed + 7919).sample(ids, spec.adversarial))
    devices = []
    for device_id, profile in zip(ids, profiles, strict=True):
        overrides: dict[str, Any] = {
            "device.id": device_id,
            "device.class": profile.name,
            "device.tags": (profile.name,),
            "broker.keepalive_s": spec.keepalive,
            "broker.reconnect_min_s": 0.2,
            "broker.reconnect_max_s": 5.0,
            "agent.state_dir": spec.state_root / device_id,
            "agent.slots": profile.slots,
            "agent.capacity_interval_s": spec.capacity_interval,
            "agent.capacity_min_interval_s": min(1.0, spec.capacity_interval),
            "agent.probe": False,
            "agent.drain_timeout_s": 5.0,
            # Many agents share one disk here; a simulated device need not survive power loss.
            "outbox.sync": "normal",
            "fetch.origins": spec.fetch_origins,
            # A virtual device's image updates are simulated (lepton.sim.updater), never real.
            "update.enabled": False,
            **spec.extra,
        }
        if spec.enrolment is None:  # else the identity names the fleet and the broker
            overrides |= {
                "device.fleet": spec.fleet,
                "broker.host": spec.broker_host,
                "broker.port": spec.broker_port,
            }
        if spec.ca_file is not None:
            overrides |= {"broker.ca_file": spec.ca_file, "fetch.ca_file": spec.ca_file}
        if device_id in data:
            overrides["data"] = data[device_id]
        config: AgentConfig = load_config(None, env={}, overrides=overrides)
        transform: UpdateTransform | None = None
        claim: int | None = None
        if device_id in hostile:
            from lepton.sim.attacks import make

            transform = make(spec.attack, spec.attack_scale)
            claim = spec.forged_examples
        updater = (
            SimulatedUpdater(
                device_id=device_id,
                state_dir=config.agent.state_dir,
                root_file=spec.release_root,
                version=spec.agent_version or __version__,
                device_class=profile.name,
                fail=spec.update_fail,
                trial_s=spec.trial_s,
            )
            if spec.release_root is not None
            else None
        )
        devices.append(
            VirtualDevice(
                config,
                profile,
                host_gflops=spec.host_gflops,
                executor=executor,
                flaky_per_min=spec.flaky_per_min,
                crash_per_min=spec.crash_per_min,
                rng=random.Random(rng.random()),
                # Many devices train on one host: one thread each, not to oversubscribe it.
                train_threads=1,
                update_transform=transform,
                claim_examples=claim,
                updater=updater,
            )
        )
    return devices


async def run_fleet(devices: list[VirtualDevice], stop: asyncio.Event) -> None:
    """Run every device until ``stop`` is set, then shut them all down gracefully."""
    counts = Counter(d.profile.name for d in devices)
    log.info(
        "sim: starting %d devices (%s)",
        len(devices),
        ", ".join(f"{n} {k}" for k, n in sorted(counts.items())),
    )
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(d.run(), name=d.config.device.id) for d in devices]
        await stop.wait()
        for d in devices:
            d.stop()
        _done, pending = await asyncio.wait(tasks, timeout=30)
        for t in pending:
            t.cancel()
    log.info(
        "sim: %d devices stopped (%d crashes, %d link flaps injected, %d update restarts)",
        len(devices),
        sum(d.crashes for d in devices),
        sum(d.flaps for d in devices),
        sum(d.restarts for d in devices),
    )
