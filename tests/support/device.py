"""The fake device of the tests: an in-process MQTT client that speaks the agent's side of
the protocol for coordinator tests: Last Will, retained birth, periodic capacity reports,
task acks, results re-sent until acknowledged, and refusal of a second copy of the same
attempt. Its ``behaviour`` makes it run, refuse, fail, ignore or only acknowledge tasks.

Tests that need real agents use :mod:`lepton.sim` (virtual devices that are real agents) or
real agent processes (:mod:`tests.support.agents`).

Built on paho's network thread; protocol logic runs on the test's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from lepton.protocol import codec, topics
from lepton.protocol.messages import (
    Bench,
    CapacityReport,
    Cpu,
    Memory,
    Result,
    ResultAck,
    Slots,
    State,
    Task,
    TaskAck,
)


def report(
    *,
    slots: int = 2,
    busy: int = 0,
    interval_s: float = 5.0,
    gflops: float = 10.0,
    ts: float | None = None,
    mem_available: int = 2 << 30,
    runtimes: tuple[str, ...] = ("onnxruntime",),
    device_class: str | None = "rpi5",
    **extra: Any,
) -> CapacityReport:
    return CapacityReport(
        ts=time.time() if ts is None else ts,
        device_class=device_class,
        device_model="Raspberry Pi 5",
        cpu=Cpu(count=4, percent=10.0),
        memory=Memory(total=4 << 30, available=mem_available),
        runtimes=list(runtimes),
        bench=Bench(fp32_gflops=gflops),
        slots=Slots(total=slots, busy=busy),
        interval_s=interval_s,
        **extra,
    )


Behaviour = Literal["run", "refuse", "fail", "ignore", "ack_only"]


@dataclass
class FakeDevice:
    port: int
    device_id: str
    fleet: str = "default"
    slots: int = 2
    interval_s: float = 1.0
    gflops: float = 10.0
    behaviour: Behaviour = "run"
    run_s: float = 0.0
    refuse_reason: str = "queue_full"
    resend_after_s: float = 0.5
    device_class: str | None = "rpi5"
    report_extra: dict[str, Any] = field(default_factory=dict)
    # A broker account (an enrolled device's MQTT username and password); empty: anonymous.
    username: str = ""
    password: str = ""

    tasks: list[Task] = field(default_factory=list)
    executions: Counter[str] = field(default_factory=Counter)
    outbox: dict[str, Result] = field(default_factory=dict)
    acked: set[str] = field(default_factory=set)
    reporting: bool = True

    def __post_init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._accepted: set[tuple[str, int]] = set()
        self._running = 0
        self._bg: list[asyncio.Task[None]] = []
        self._changed = asyncio.Event()
        self._connected = asyncio.Event()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"sim-{self.device_id}",
            protocol=paho.MQTTv5,
        )
        self.client.will_set(
            self._topic(topics.STATE), codec.encode(State(state="offline")), qos=1, retain=True
        )
        if self.username:
            self.client.username_pw_set(self.username, self.password)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect
        #: time.monotonic() of the last disconnect paho reported (0: none yet).
        self.disconnected_at = 0.0

    # ------------------------------------------------------------------ lifecycle

    def _topic(self, channel: str) -> str:
        return topics.device_topic(self.fleet, self.device_id, channel)

    async def __aenter__(self) -> FakeDevice:
        self._loop = asyncio.get_running_loop()
        self.client.connect("127.0.0.1", self.port, keepalive=10)
        self.client.loop_start()
        async with asyncio.timeout(10):
            await self._connected.wait()
        birth = State(state="online", agent_version="sim-1", device_class=self.device_class)
        self.client.publish(self._topic(topics.STATE), codec.encode(birth), qos=1, retain=True)
        self._bg.append(asyncio.create_task(self._report_loop()))
        self._bg.append(asyncio.create_task(self._resend_loop()))
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close(graceful=True)

    async def close(self, *, graceful: bool) -> None:
        """Graceful: offline state then DISCONNECT. Not graceful: drop the socket, so the
        broker publishes the Last Will."""
        for task in self._bg:
            task.cancel()
        for task in self._bg:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._bg.clear()
        if graceful:
            info = self.client.publish(
                self._topic(topics.STATE), codec.encode(State(state="offline")), qos=1, retain=True
            )
            with contextlib.suppress(Exception):
                await asyncio.to_thread(info.wait_for_publish, 2)
            self.client.disconnect()
            await asyncio.to_thread(self.client.loop_stop)
        else:
            await asyncio.to_thread(self.client.loop_stop)
            sock = self.client.socket()
            if sock is not None:
                sock.close()

    def _on_connect(self, client: paho.Client, *_args: Any) -> None:
        client.subscribe(topics.cmd_filter(self.fleet, self.device_id), qos=1)
        self._call(self._connected.set)

    def _on_disconnect(self, *_args: Any) -> None:
        self.disconnected_at = time.monotonic()

    def _on_message(self, _client: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        self._call(self._dispatch, msg.topic, bytes(msg.payload))

    def _call(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(fn, *args)

    # ------------------------------------------------------------------ protocol

    def publish(self, channel: str, payload: bytes, *, qos: int = 1) -> None:
        self.client.publish(self._topic(channel), payload, qos=qos)

    def send_report(self, **kw: Any) -> None:
        busy = min(self._running, self.slots)
        kw = {**self.report_extra, **kw}
        r = report(
            slots=self.slots,
            busy=busy,
            interval_s=self.interval_s,
            gflops=self.gflops,
            device_class=self.device_class,
            **kw,
        )
        self.publish(topics.CAPACITY, codec.encode(r), qos=0)

    async def _report_loop(self) -> None:
        while True:
            if self.reporting:
                self.send_report()
            await asyncio.sleep(self.interval_s)

    async def _resend_loop(self) -> None:
        while True:
            await asyncio.sleep(self.resend_after_s)
            for result in list(self.outbox.values()):
                self.publish(topics.RESULT, codec.encode(result))

    def _dispatch(self, topic: str, payload: bytes) -> None:
        channel = topic.rsplit("/", 1)[1]
        if channel == topics.TASK:
            task = codec.decode(payload, Task)
            self.tasks.append(task)
            self._on_task(task)
        elif channel == topics.RESULT_ACK:
            ack = codec.decode(payload, ResultAck)
            for rid in ack.ids:
                self.outbox.pop(rid, None)
                self.acked.add(rid)
        self._changed.set()

    def _ack(self, task: Task, accepted: bool, reason: str | None = None) -> None:
        msg = TaskAck(task_id=task.task_id, accepted=accepted, reason=reason)
        self.publish(topics.TASK_ACK, codec.encode(msg))

    def _on_task(self, task: Task) -> None:
        key = (task.task_id, task.attempt)
        if key in self._accepted:
            self._ack(task, False, "duplicate")
            return
        if self.behaviour == "ignore":
            return
        if task.expires_at < time.time():
            self._ack(task, False, "expired")
            return
        if self.behaviour == "refuse":
            self._ack(task, False, self.refuse_reason)
            return
        self._accepted.add(key)
        self._ack(task, True)
        if self.behaviour != "ack_only":
            self._bg.append(asyncio.create_task(self._run(task)))

    async def _run(self, task: Task) -> None:
        self._running += 1
        self.executions[task.task_id] += 1
        started = time.time()
        try:
            await asyncio.sleep(float(task.params.get("sleep_s", self.run_s)))
        finally:
            self._running -= 1
        if self.behaviour == "fail":
            result = Result(
                task_id=task.task_id,
                status="failed",
                attempt=task.attempt,
                error="simulated failure",
                started_at=started,
                finished_at=time.time(),
            )
        else:
            result = Result(
                task_id=task.task_id,
                status="succeeded",
                attempt=task.attempt,
                output={"echo": task.params.get("payload")},
                started_at=started,
                finished_at=time.time(),
            )
        self.outbox[result.id] = result
        self.publish(topics.RESULT, codec.encode(result))

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.2):
                        await self._changed.wait()
