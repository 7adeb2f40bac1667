"""Real agents under test and their peer: ``lepton-agent run`` processes
(:class:`AgentProcess`, configs from :func:`write_agent_config`) and a result sink playing the
coordinator's part (:class:`Sink`). The fake device for coordinator tests is
:mod:`tests.support.device`; fleets of real agents in one process are :mod:`lepton.sim`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt

from lepton.agent.identity import identity_path
from lepton.protocol import topics
from lepton.protocol.codec import decode, encode
from lepton.protocol.errors import DecodeError
from lepton.protocol.messages import (
    CapacityReport,
    Result,
    ResultAck,
    State,
    Task,
    TaskAck,
    TaskCancel,
)

REPO = Path(__file__).resolve().parents[2]


class Sink:
    """Subscribes to every device channel of a fleet, applies results once (by id), acks them.

    Reconnects on its own (persistent session), so it survives broker restarts.
    """

    def __init__(
        self,
        port: int,
        *,
        fleet: str = "default",
        ack: bool = True,
        client_id: str = "sink",
        keepalive: int = 5,
    ) -> None:
        self.keepalive = keepalive
        self.port = port
        self.fleet = fleet
        self.ack = ack
        self.client_id = client_id
        self.applied: dict[str, Result] = {}
        self.deliveries = 0
        self.task_acks: dict[str, TaskAck] = {}
        self.states: dict[str, list[tuple[float, State]]] = {}
        self.capacity: dict[str, CapacityReport] = {}
        self.rejects: list[str] = []
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self.connected = asyncio.Event()

    async def __aenter__(self) -> Sink:
        self._task = asyncio.create_task(self._run())
        async with asyncio.timeout(10):
            await self.connected.wait()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client(
                    "127.0.0.1",
                    self.port,
                    identifier=self.client_id,
                    clean_session=False,
                    keepalive=self.keepalive,
                ) as client:
                    await client.subscribe(topics.device_filter(self.fleet, "#"), qos=1)
                    self._client = client
                    self.connected.set()
                    async for message in client.messages:
                        await self._on(client, str(message.topic), bytes(message.payload))  # type: ignore[arg-type]
            except aiomqtt.MqttError:
                pass
            finally:
                self._client = None
                self.connected.clear()
            await asyncio.sleep(0.2)

    async def _on(self, client: aiomqtt.Client, topic: str, payload: bytes) -> None:
        t = topics.parse(topic)
        try:
            msg = decode(payload)
        except DecodeError as exc:
            self.rejects.append(exc.reason)
            return
        if isinstance(msg, Result):
            self.deliveries += 1
            self.applied.setdefault(msg.id, msg)
            if self.ack:
                ack = ResultAck(ids=[msg.id])
                await client.publish(
                    topics.cmd_topic(self.fleet, t.device_id, topics.RESULT_ACK), encode(ack), qos=1
                )
        elif isinstance(msg, TaskAck):
            self.task_acks[msg.task_id] = msg
        elif isinstance(msg, State):
            self.states.setdefault(t.device_id, []).append((time.monotonic(), msg))
        elif isinstance(msg, CapacityReport):
            self.capacity[t.device_id] = msg
        self._changed.set()

    def state_of(self, device_id: str) -> str | None:
        seq = self.states.get(device_id)
        return seq[-1][1].state if seq else None

    async def wait(
        self, predicate: Callable[[], bool], timeout: float, what: str = "condition"
    ) -> None:
        """Wait (event driven) until ``predicate()`` holds."""
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    self._changed.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.5):
                            await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None

    async def send(self, device_id: str, payload: bytes) -> None:
        assert self._client is not None, "sink not connected"
        await self._client.publish(
            topics.cmd_topic(self.fleet, device_id, topics.TASK), payload, qos=1
        )

    async def send_raw(self, topic: str, payload: bytes) -> None:
        """Publish any bytes on any topic (hostile input)."""
        assert self._client is not None, "sink not connected"
        await self._client.publish(topic, payload, qos=1)

    async def send_cancel(self, device_id: str, task_ids: list[str], reason: str = "test") -> None:
        """Publish a TaskCancel for these tasks on the device's cancel channel."""
        assert self._client is not None, "sink not connected"
        await self._client.publish(
            topics.cmd_topic(self.fleet, device_id, topics.CANCEL),
            encode(TaskCancel(task_ids=task_ids, reason=reason)),
            qos=1,
        )

    async def send_task(
        self, device_id: str, kind: str = "echo", *, ttl: float = 300.0, **params: Any
    ) -> Task:
        task = Task(
            task_id=f"t{os.urandom(6).hex()}",
            kind=kind,
            params=params,
            expires_at=time.time() + ttl,
        )
        await self.send(device_id, encode(task))
        return task

    async def send_tasks(
        self, device_id: str, n: int, kind: str = "echo", **params: Any
    ) -> list[Task]:
        """Publish ``n`` tasks, up to 100 in flight at a time."""
        tasks: list[Task] = []
        for start in range(0, n, 100):
            tasks += await asyncio.gather(
                *(self.send_task(device_id, kind, **params) for _ in range(min(100, n - start)))
            )
        return tasks

    def results_for(self, task_ids: set[str]) -> dict[str, Result]:
        return {r.task_id: r for r in self.applied.values() if r.task_id in task_ids}


def enrol_agent(
    config_path: Path,
    url: str,
    claim: str,
    *,
    device_id: str | None = None,
    args: tuple[str, ...] = (),
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[str]:
    """Run the real ``lepton-agent enroll URL CLAIM --config ...`` (its state directory is
    the config's); returns the finished process (exit code, stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEPTON_")}
    env["PYTHONPATH"] = str(REPO)
    cmd = [sys.executable, "-m", "lepton.agent", "enroll", url, claim]
    cmd += ["--config", str(config_path), *(["--device-id", device_id] if device_id else [])]
    return subprocess.run(
        [*cmd, *args],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=timeout,
    )


def write_agent_config(
    path: Path,
    *,
    device_id: str,
    port: int,
    state_dir: Path,
    enrol: tuple[str, str] | None = None,
    **sections: dict[str, Any],
) -> Path:
    """Write a TOML config for an agent under test. ``enrol=(coordinator URL, claim)``:
    then enrol the agent with the real CLI, so it runs with its own identity (its broker
    account and HTTP token; the broker address stays the test broker's)."""
    cfg: dict[str, dict[str, Any]] = {
        "device": {"id": device_id},
        "broker": {
            "host": "127.0.0.1",
            "port": port,
            "keepalive_s": 5,
            "reconnect_min_s": 0.1,
            "reconnect_max_s": 1.0,
        },
        "agent": {
            "state_dir": str(state_dir),
            "capacity_interval_s": 1.0,
            "capacity_min_interval_s": 0.2,
            "probe": False,
        },
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    lines = []
    for section, values in cfg.items():
        lines.append(f"[{section}]")
        for k, v in values.items():
            if isinstance(v, bool):
                lines.append(f"{k} = {'true' if v else 'false'}")
            elif isinstance(v, (int, float)):
                lines.append(f"{k} = {v}")
            elif isinstance(v, (list, tuple)):
                lines.append(f"{k} = [{', '.join(repr(str(x)) for x in v)}]".replace("'", '"'))
            else:
                lines.append(f'{k} = "{v}"')
        lines.append("")
    path.write_text("\n".join(lines))
    if enrol is not None:
        done = enrol_agent(path, *enrol, device_id=device_id)
        assert done.returncode == 0, f"enrolment of {device_id} failed: {done.stderr}"
    return path


@dataclass(frozen=True, slots=True)
class Enrol:
    """Where an agent enrols (the coordinator's URL), with which claim, and the state
    directory its identity goes to (the config's ``agent.state_dir``)."""

    url: str
    claim: str
    state_dir: Path


@dataclass
class AgentProcess:
    """A real ``lepton-agent run`` process (``module``: another entry point with that CLI).
    With ``enrol``, the process first runs ``lepton-agent enroll`` (once: not when its state
    directory holds an identity), so it runs as an enrolled device; its log says why not."""

    config_path: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)
    module: str = "lepton.agent"
    enrol: Enrol | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LEPTON_")}
        env.update(self.env)
        env["PYTHONPATH"] = str(REPO)
        self._log = self.log_path.open("ab")
        run = [sys.executable, "-m", self.module, "run", "--config", str(self.config_path)]
        if self.enrol is not None and not identity_path(self.enrol.state_dir).exists():
            # Enrolled by the child, not here: the coordinator that answers may run on the
            # test's own event loop, which a blocking call would stall.
            enroll = [sys.executable, "-m", "lepton.agent", "enroll", self.enrol.url]
            enroll += [self.enrol.claim, "--config", str(self.config_path)]
            run = ["sh", "-c", f"{shlex.join(enroll)} && exec {shlex.join(run)}"]
        self.proc = subprocess.Popen(
            run,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
        )

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        rc = self.proc.wait(timeout=timeout)
        self._log.close()
        return rc

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.proc is not None:
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")
