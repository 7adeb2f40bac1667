"""One virtual device: a real :class:`~lepton.agent.daemon.Agent` whose reports and work follow a
profile.

What is simulated: the figures the device reports (model, cores, memory, throughput, battery,
temperature) and how long its work takes. Work itself is real: handlers run on this host, and
the measured time is stretched by ``host speed / profile speed`` (doubled while thermally
throttled). A host cannot make work faster than it is, so devices faster than the host take the
host's time.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import logging
import random
import socket
import sys
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from lepton.agent.config import AgentConfig
from lepton.agent.daemon import Agent
from lepton.agent.handlers import (
    Handler,
    HandlerRegistry,
    TaskContext,
    TaskServices,
    default_registry,
)
from lepton.agent.telemetry.probe import ProbeResult
from lepton.protocol.codec import encode
from lepton.protocol.messages import (
    Battery,
    Bench,
    CapacityReport,
    Cpu,
    Disk,
    Memory,
    Slots,
    State,
    Task,
    Thermal,
)
from lepton.protocol.tasks import (
    BENCHMARK,
    DEPLOY,
    ECHO,
    EVALUATE,
    INFER,
    TRAIN,
    BenchmarkOutput,
    encode_output,
)
from lepton.sim.attacks import forge_examples
from lepton.sim.profiles import Profile

if TYPE_CHECKING:
    from lepton.agent.handlers import UpdateTransform
    from lepton.sim.updater import SimulatedUpdater

log = logging.getLogger(__name__)

AMBIENT_C = 40.0
THROTTLE_AT_C = 80.0
# Work whose duration the task itself fixes is not stretched.
UNSCALED_KINDS = frozenset({ECHO})
# Updates are not compute: their time is the download and the (simulated) restart.
UNPACED_KINDS = frozenset({"install", "revert"})
MAX_STRETCH_S = 600.0
# How long a device about to restart into a new image waits for its results to be acknowledged.
SETTLE_TIMEOUT_S = 15.0
# Libraries a handler imports on first use. Importing them is this host's one-time cost, not
# the device's compute, so it happens before the clock starts (torch takes seconds, which
# stretched 10x would make a Pi's first training round look a minute long).
FIRST_USE_IMPORTS: dict[str, tuple[str, ...]] = {
    TRAIN: ("torch",),
    EVALUATE: ("torch",),
    DEPLOY: ("numpy", "onnxruntime"),
    INFER: ("numpy", "onnxruntime"),
}


@dataclass
class SimState:
    """The physical state a profile evolves: battery, temperature, load."""

    battery: float = 100.0
    temperature: float = AMBIENT_C
    busy_fraction: float = 0.0
    last: float = field(default_factory=time.monotonic)

    def advance(self, profile: Profile, busy: int, slots: int) -> None:
        now = time.monotonic()
        minutes = (now - self.last) / 60.0
        self.last = now
        load = busy / max(1, slots)
        self.busy_fraction = load
        if profile.battery:
            drain = profile.drain_busy if busy else profile.drain_idle
            self.battery = max(0.0, self.battery - drain * minutes)
        target = AMBIENT_C + profile.heat_rise_c * load
        # First-order thermal response with a ~1 minute time constant.
        alpha = min(1.0, minutes / 1.0)
        self.temperature += (target - self.temperature) * alpha

    @property
    def throttled(self) -> bool:
        return self.temperature >= THROTTLE_AT_C


class ProfileSampler:
    """Capacity reports shaped by a profile (implements
    :class:`lepton.agent.telemetry.capacity.Sampler`)."""

    def __init__(self, profile: Profile, state: SimState, *, tags: tuple[str, ...] = ()) -> None:
        self.profile = profile
        self.state = state
        self.tags = tags
        self.started = time.time()
        self._probe: ProbeResult | None = None

    @property
    def probe(self) -> ProbeResult | None:
        return self._probe

    @probe.setter
    def probe(self, probe: ProbeResult | None) -> None:
        self._probe = probe

    @property
    def device_class(self) -> str | None:
        return self.profile.name

    def sample(
        self, *, slots: Slots, outbox_pending: int, counters: Mapping[str, int], interval_s: float
    ) -> CapacityReport:
        p, st = self.profile, self.state
        st.advance(p, slots.busy, slots.total)
        slow = 0.5 if st.throttled else 1.0
        used = int(p.memory_bytes * (0.25 + 0.25 * st.busy_fraction))
        return CapacityReport(
            device_model=p.device_model,
            device_class=p.name,
            cpu=Cpu(
                count=p.cores,
                percent=min(100.0, 100.0 * st.busy_fraction),
                load1=p.cores * st.busy_fraction,
                arch="aarch64" if p.name != "x86-gateway" else "x86_64",
            ),
            memory=Memory(total=p.memory_bytes, available=p.memory_bytes - used),
            disk=Disk(total=32 << 30, free=20 << 30),
            thermal=Thermal(
                temperature_c=round(st.temperature, 1), throttled=st.throttled, source="sim"
            ),
            battery=Battery(percent=round(st.battery, 2), plugged=False) if p.battery else None,
            accelerators=list(p.accelerators),
            runtimes=list(p.runtimes),
            bench=Bench(
                fp32_gflops=p.fp32_gflops * slow,
                int8_gops=p.int8_gops * slow,
                runtime="profile",
                measured_at=self.started,
            ),
            slots=slots,
            outbox_pending=outbox_pending,
            interval_s=interval_s,
            uptime_s=time.time() - self.started,
            counters=dict(counters),
            tags=["sim", *self.tags],
        )


def stretch_factor(profile: Profile, state: SimState, host_gflops: float, task: Task) -> float:
    """How much longer ``task`` takes on ``profile`` than on this host."""
    precision = str(task.params.get("precision", "fp32"))
    speed = profile.int8_gops if precision == "int8" else profile.fp32_gflops
    if state.throttled:
        speed *= 0.5
    return max(1.0, host_gflops / max(speed, 1e-9))


def scaled_registry(
    profile: Profile,
    state: SimState,
    host_gflops: float,
    *,
    train_threads: int | None = None,
    update_transform: UpdateTransform | None = None,
    claim_examples: int | None = None,
    updater: SimulatedUpdater | None = None,
) -> HandlerRegistry:
    """The default handlers, with compute stretched to the profile's speed. Every task's
    services get this registry's ``pace`` and, where given, ``train_threads``,
    ``update_transform`` (an adversarial device's attack) and ``updater`` (the device's
    simulated A/B slots); ``claim_examples``: train results claim this many examples (a
    forged count)."""
    base = default_registry()
    registry = HandlerRegistry()
    # Task id -> start of the part of its work not stretched yet. A handler's ``pace``
    # point (a training task's upload) stretches the work before it and the handler's end
    # the rest, so the upload leaves when the simulated device would send it.
    marks: dict[str, float] = {}

    async def stretch(task: Task) -> None:
        started = marks.get(task.id)
        if started is None:
            return
        extra = (time.perf_counter() - started) * (
            stretch_factor(profile, state, host_gflops, task) - 1.0
        )
        if extra > 0:
            await asyncio.sleep(min(extra, MAX_STRETCH_S))
        marks[task.id] = time.perf_counter()

    def services(base: TaskServices) -> TaskServices:
        extra: dict[str, Any] = {} if updater is None else {"updater": updater}
        return dataclasses.replace(
            base,
            pace=stretch,
            train_threads=base.train_threads if train_threads is None else train_threads,
            update_transform=update_transform or base.update_transform,
            **extra,
        )

    def wrap(kind: str, handler: Handler) -> Handler:
        async def run(task: Task, ctx: TaskContext) -> dict[str, Any]:
            ctx = dataclasses.replace(ctx, services=services(ctx.services))
            for module in FIRST_USE_IMPORTS.get(kind, ()):
                if module not in sys.modules:
                    await asyncio.to_thread(importlib.import_module, module)
            if kind not in UNPACED_KINDS:
                marks[task.id] = time.perf_counter()
            try:
                output = await handler(task, ctx)
                await ctx.cancel.interrupt(stretch(task))
            finally:
                marks.pop(task.id, None)
            if kind == TRAIN and claim_examples is not None:
                output = forge_examples(output, claim_examples)
            return output

        return run

    async def benchmark(task: Task, ctx: TaskContext) -> dict[str, Any]:
        slow = 0.5 if state.throttled else 1.0
        output = BenchmarkOutput(
            fp32_gflops=profile.fp32_gflops * slow,
            int8_gops=profile.int8_gops * slow,
            runtime="profile",
            wall_s=0.0,
        )
        return encode_output(BENCHMARK, output)

    for kind in base.kinds():
        handler = base.get(kind)
        assert handler is not None
        registry.register(kind, handler if kind in UNSCALED_KINDS else wrap(kind, handler))
    registry.register(BENCHMARK, benchmark)
    return registry


class SimAgent(Agent):
    """An agent whose birth message reports its simulated updater's running version and
    update status (a real agent's reports its installed image's)."""

    def __init__(self, updater: SimulatedUpdater | None, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sim_updater = updater

    def birth(self) -> State:
        """The birth message this agent sends on (re)connecting."""
        return self._birth()

    def _birth(self) -> State:
        state = super()._birth()
        u = self.sim_updater
        if u is None:
            return state
        return msgspec.structs.replace(state, agent_version=u.running_version(), update=u.status())


class VirtualDevice:
    """Runs one profile-shaped agent, with optional link flaps and crashes."""

    def __init__(
        self,
        config: AgentConfig,
        profile: Profile,
        *,
        host_gflops: float,
        executor: Executor | None = None,
        flaky_per_min: float = 0.0,
        crash_per_min: float = 0.0,
        rng: random.Random | None = None,
        train_threads: int | None = None,
        update_transform: UpdateTransform | None = None,
        claim_examples: int | None = None,
        updater: SimulatedUpdater | None = None,
    ) -> None:
        self.config = config
        self.updater = updater
        self._restart: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.restarts = 0
        self.profile = profile
        self.train_threads = train_threads
        self.update_transform = update_transform
        self.claim_examples = claim_examples
        self.state = SimState(
            battery=(rng or random).uniform(60, 100) if profile.battery else 100.0
        )
        self.host_gflops = host_gflops
        self.executor = executor
        self.flaky_per_min = flaky_per_min
        self.crash_per_min = crash_per_min
        self.rng = rng or random.Random()
        self.agent: SimAgent | None = None
        self._pending: set[asyncio.Future[bool]] = set()
        self.crashes = 0
        self.flaps = 0

    def _make_agent(self) -> SimAgent:
        return SimAgent(
            self.updater,
            self.config,
            registry=scaled_registry(
                self.profile,
                self.state,
                self.host_gflops,
                train_threads=self.train_threads,
                update_transform=self.update_transform,
                claim_examples=self.claim_examples,
                updater=self.updater,
            ),
            sampler=ProfileSampler(self.profile, self.state, tags=self.config.device.tags),
            outbox_executor=self.executor,
        )

    async def run(self) -> None:
        """Run until cancelled; crashes restart the agent on the same state directory, and so
        do updates (into the new slot, or back to the old one)."""
        self._loop = asyncio.get_running_loop()
        self._restart = asyncio.Event()
        if self.updater is not None:
            self.updater.restart = self._request_restart
            self.updater.add_listener(lambda _status: self._call_soon(self._republish))
        while True:
            if self.updater is not None:
                self.updater.boot()
            agent = self._make_agent()
            self.agent = agent
            async with agent:
                runner = asyncio.create_task(agent.run(), name=f"agent-{self.config.device.id}")
                trial = (
                    asyncio.create_task(self._trial(agent), name="trial")
                    if self.updater is not None and self.updater.in_trial
                    else None
                )
                try:
                    ended = await self._chaos(runner)
                finally:
                    if trial is not None:
                        trial.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await trial
                if ended == "stopped":
                    return
            if ended == "crashed":
                await asyncio.sleep(self.rng.uniform(1.0, 5.0))

    def stop(self) -> None:
        if self.agent is not None:
            self.agent.stop()

    def _call_soon(self, fn: Callable[[], None]) -> None:
        # The updater may be called from a handler's worker thread.
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn)

    def _request_restart(self) -> None:
        restart = self._restart
        if restart is not None:
            self._call_soon(restart.set)

    def _republish(self) -> None:
        """Send the birth message again: the update status changed without a restart."""
        agent = self.agent
        if agent is None or not agent.link.connected.is_set():
            return  # the next connection sends it
        payload = encode(agent.birth())
        coro = agent.link.publish(agent.link.state_topic, payload, qos=1, retain=True)
        task = asyncio.ensure_future(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _settle(self, agent: Agent) -> None:
        """Before a restart for an update: the install's time, then until the coordinator
        acknowledged the task's result (a real installer takes seconds, so the result is
        long delivered when the agent restarts; a goodbye first would fail the task)."""
        assert self.updater is not None
        await asyncio.sleep(self.updater.install_s)
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        # The outbox signals no "empty"; a short poll bounded by the deadline will do.
        while len(agent.outbox) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)

    async def _trial(self, agent: Agent) -> None:
        """The new version proves itself once connected (or fails, and the updater asks for
        the restart back into the old slot)."""
        assert self.updater is not None
        await agent.link.connected.wait()
        await self.updater.trial(None)

    async def _chaos(self, runner: asyncio.Task[None]) -> Literal["stopped", "crashed", "restart"]:
        """Wait for the agent; inject link flaps and crashes; restart it when the updater asks
        (gracefully: the install task's result goes out first; a failed trial crashes)."""
        assert self._restart is not None
        rate = self.flaky_per_min + self.crash_per_min
        restart = asyncio.ensure_future(self._restart.wait())
        try:
            while True:
                wait = self.rng.expovariate(rate / 60.0) if rate > 0 else None
                done, _ = await asyncio.wait(
                    {runner, restart}, timeout=wait, return_when=asyncio.FIRST_COMPLETED
                )
                if runner in done:
                    runner.result()
                    return "stopped"
                if restart in done:
                    self._restart.clear()
                    self.restarts += 1
                    crash = self.updater is not None and self.updater.status().outcome == (
                        "rolled_back"
                    )
                    if crash:  # a crash loop: no goodbye, the will says offline
                        self._drop_link()
                        runner.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await runner
                    else:
                        assert self.agent is not None
                        await self._settle(self.agent)
                        self.agent.stop()
                        await runner
                    log.info("sim: %s restarts (update)", self.config.device.id)
                    return "restart"
                if self.rng.random() < self.crash_per_min / rate:
                    self._drop_link()
                    runner.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await runner
                    self.crashes += 1
                    log.info("sim: %s crashed", self.config.device.id)
                    return "crashed"
                self._drop_link()
                self.flaps += 1
        except asyncio.CancelledError:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
            raise
        finally:
            restart.cancel()

    def _drop_link(self) -> None:
        """Cut the TCP connection under the MQTT client, as a failing network would."""
        agent = self.agent
        client = getattr(agent.link, "_client", None) if agent else None
        sock = client._client.socket() if client is not None else None
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
