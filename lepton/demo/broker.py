"""MQTT brokers for local runs: Mosquitto on a free port, or an embedded Python broker.

:class:`MosquittoBroker` runs the ``mosquitto`` binary with a config written into its own
directory (port, persistence, log); the test suite and the benchmarks use it too
(``tests/support/broker.py`` re-exports it). :class:`EmbeddedBroker` runs amqtt
(``python -m lepton.demo.embedded_broker``) as its own process, so ``lepton-demo``
works on a machine without Mosquitto; it speaks MQTT 3.1.1 only. :func:`start_broker`
picks one.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from lepton.demo import procs

BrokerChoice = Literal["auto", "mosquitto", "embedded"]


def mosquitto_binary() -> str | None:
    """The ``mosquitto`` executable on PATH or in /usr/sbin, or None."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(proc: subprocess.Popen[bytes], port: int, timeout: float, why: str) -> None:
    """Until something accepts on ``port``; RuntimeError if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"the broker exited ({proc.returncode}): {err} {why}".strip())
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"the broker did not listen on {port} within {timeout:g}s: {why}")


class RunningBroker(Protocol):
    """What the demo needs from a broker."""

    port: int

    @property
    def pid(self) -> int | None: ...

    @property
    def mqtt_protocol(self) -> str: ...

    def describe(self) -> str: ...

    def stop(self) -> None: ...


@dataclass
class MosquittoBroker:
    """One mosquitto process. ``stop``/``kill``/``start`` keep the same port and persistence.

    ``own_session`` starts it in its own process group (see :mod:`lepton.demo.procs`).
    ``prepared``: a configuration written beforehand (``lepton broker init``) that mosquitto
    runs as is; ``port`` is then one of its listeners (the one waited for), and ``tls`` says
    whether that listener speaks TLS.
    """

    workdir: Path
    extra_config: str = ""
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    own_session: bool = False
    prepared: Path | None = None
    tls: bool = False

    mqtt_protocol = "5"

    @property
    def conf_path(self) -> Path:
        return self.prepared if self.prepared is not None else self.workdir / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    @property
    def accounts(self) -> bool:
        """Whether it runs the dynamic security plugin (a prepared ``lepton broker init``
        config): every client needs its own account."""
        return self.prepared is not None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def describe(self) -> str:
        if self.prepared is None:
            return f"mosquitto on 127.0.0.1:{self.port}"
        return f"mosquitto on 127.0.0.1:{self.port} (TLS, an account per client)"

    def write_config(self) -> None:
        (self.workdir / "data").mkdir(parents=True, exist_ok=True)
        base = f"""\
listener {self.port} 127.0.0.1
# Run as whoever starts it (as root, mosquitto would otherwise switch to its own user and
# could not write this directory's persistence and log files).
user {getpass.getuser()}
persistence true
persistence_location {self.workdir / "data"}/
# Mosquitto 2.0 persistence rewrites the whole snapshot on each save, so saving on every
# change stalls the broker under load (O(n^2)). Save every second instead: end-to-end
# acknowledgements (agent outbox, coordinator retries) make up for what a SIGKILL loses.
autosave_on_changes false
autosave_interval 1
max_queued_messages 0
max_inflight_messages 0
log_dest file {self.log_path}
log_type error
log_type warning
log_type notice
"""
        if "allow_anonymous" not in self.extra_config:
            base += "allow_anonymous true\n"
        self.conf_path.write_text(base + self.extra_config)

    def start(self, timeout: float = 10.0) -> None:
        binary = mosquitto_binary()
        assert binary, "mosquitto binary not found"
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.prepared is None:
            self.write_config()
        argv = [binary, "-c", str(self.conf_path)]
        if self.prepared is not None:  # it logs to stderr: into the log file, never a pipe
            self.proc = procs.spawn(argv, log_path=self.log_path)
        elif self.own_session:
            self.proc = procs.spawn(argv, stderr_pipe=True)
        else:
            self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_listening(self.proc, self.port, timeout, self.log_tail())

    def _signal(self, sig: int) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def stop(self) -> None:
        """Graceful stop (SIGTERM): mosquitto writes its persistence file."""
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """Hard stop (SIGKILL)."""
        self._signal(signal.SIGKILL)

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-n:])
        except OSError:
            return ""


@dataclass
class EmbeddedBroker:
    """amqtt in its own Python process (MQTT 3.1.1; QoS 1, retained, wills, sessions)."""

    workdir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    mqtt_protocol = "3.1.1"
    tls = False
    accounts = False  # anonymous, no topic checks

    @property
    def log_path(self) -> Path:
        return self.workdir / "broker.log"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def describe(self) -> str:
        return f"embedded amqtt broker on 127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [
            sys.executable,
            "-m",
            "lepton.demo.embedded_broker",
            "--port",
            str(self.port),
        ]
        self.proc = procs.spawn(argv, log_path=self.log_path)
        try:
            wait_listening(self.proc, self.port, timeout, self.log_tail())
        except RuntimeError:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc is not None:
            procs.stop_group(self.proc, timeout=10, name="broker")
            self.proc = None

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-n:])
        except OSError:
            return ""


def pick_broker(choice: BrokerChoice = "auto") -> Literal["mosquitto", "embedded"]:
    """``auto``: Mosquitto when its binary and its dynamic security plugin are installed,
    else the embedded broker. RuntimeError when ``mosquitto`` is asked for and missing."""
    from lepton.coordinator.auth.broker_config import PLUGIN_NAME, find_plugin

    if choice == "embedded":
        return "embedded"
    installed = mosquitto_binary() is not None and find_plugin() is not None
    if choice == "mosquitto" and not installed:
        raise RuntimeError(
            f"mosquitto or its plugin {PLUGIN_NAME} is not installed (apt-get install mosquitto)"
        )
    return "mosquitto" if installed else "embedded"


def start_broker(
    workdir: Path,
    choice: BrokerChoice = "auto",
    *,
    prepared: Path | None = None,
    port: int | None = None,
) -> MosquittoBroker | EmbeddedBroker:
    """The broker :func:`pick_broker` names, started: Mosquitto runs the ``prepared``
    configuration (listening on ``port``, TLS) when given, else a plain anonymous one."""
    broker: MosquittoBroker | EmbeddedBroker
    if pick_broker(choice) == "mosquitto":
        broker = MosquittoBroker(
            workdir=workdir,
            own_session=True,
            prepared=prepared,
            tls=prepared is not None,
            port=port if port is not None else free_port(),
        )
    else:
        broker = EmbeddedBroker(workdir=workdir)
    broker.start()
    return broker
