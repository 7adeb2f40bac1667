"""A real Mosquitto broker for tests: own port, own config, own persistence directory."""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


def mosquitto_binary() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Broker:
    """One mosquitto process. ``stop``/``kill``/``start`` keep the same port and persistence."""

    workdir: Path
    extra_config: str = ""
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def conf_path(self) -> Path:
        return self.workdir / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    def write_config(self) -> None:
        (self.workdir / "data").mkdir(parents=True, exist_ok=True)
        base = f"""\
listener {self.port} 127.0.0.1
# Run as whoever runs the tests (as root, mosquitto would otherwise switch to its own user
# and could not write the test's persistence and log files).
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
        self.write_config()
        self.proc = subprocess.Popen(
            [binary, "-c", str(self.conf_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"mosquitto exited: {err} {self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"mosquitto did not listen on {self.port}: {self.log_tail()}")

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
