"""A small stand-in for systemd, for machines (containers) where systemd is not PID 1.

It runs the shipped ``deploy/systemd/lepton-agent.service``'s own ``ExecStartPre=`` and
``ExecStart=`` lines (with ``/opt/lepton`` and ``/etc/lepton/agent.toml`` replaced by a test's
paths, and the ``+`` privilege prefix dropped: the test owns the root) with
``Restart=on-failure`` semantics: a start whose ``ExecStartPre`` fails or whose main process
exits non-zero is started again after ``restart_s`` (the unit's ``RestartSec=10s``, shortened
for tests); a clean exit (0) ends supervision. What it does not emulate: the sandboxing, the
watchdog, ``Type=notify`` readiness, cgroups; the units themselves are checked by
``systemd-analyze verify`` in tests/agent/test_systemd_unit.py.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
UNIT = REPO / "deploy/systemd/lepton-agent.service"


def unit_commands(root: Path, config: Path) -> tuple[list[str], list[str]]:
    """(ExecStartPre, ExecStart) argv of the shipped unit, for ``root`` and ``config``."""
    pre: list[str] = []
    start: list[str] = []
    for line in UNIT.read_text().splitlines():
        key, _, value = line.partition("=")
        if key not in ("ExecStartPre", "ExecStart"):
            continue
        value = value.lstrip("+-!@")
        value = value.replace("/opt/lepton", str(root)).replace(
            "/etc/lepton/agent.toml", str(config)
        )
        (pre if key == "ExecStartPre" else start).extend(shlex.split(value))
    assert pre, "the unit must have ExecStartPre="
    assert start, "the unit must have ExecStart="
    return pre, start


@dataclass
class Start:
    pre_rc: int
    rc: int | None = None
    current: str = ""
    restarted: bool = False  # stopped by a restart request (``systemctl restart``)


@dataclass
class Supervisor:
    root: Path
    config: Path
    restart_s: float = 0.3
    log: Path | None = None
    starts: list[Start] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="supervisor", daemon=True)
        self.exited = threading.Event()

    def env(self) -> dict[str, str]:
        # As under systemd: nothing of the test's tree is importable by the agent.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "LEPTON_"))}
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start(self) -> Supervisor:
        self._thread.start()
        return self

    def _loop(self) -> None:
        pre, start = unit_commands(self.root, self.config)
        out = self.log.open("ab") if self.log else subprocess.DEVNULL
        try:
            while not self._stop.is_set():
                done = subprocess.run(pre, env=self.env(), stdout=out, stderr=out, check=False,
                                      timeout=60)  # fmt: skip
                entry = Start(pre_rc=done.returncode, current=os.readlink(self.root / "current"))
                self.starts.append(entry)
                if done.returncode == 0:
                    with self._lock:
                        if self._stop.is_set():
                            break
                        self._proc = subprocess.Popen(start, env=self.env(), stdout=out,
                                                      stderr=out)  # fmt: skip
                    entry.rc = self._wait(self._proc)
                    if entry.rc == 0 and not entry.restarted:
                        break  # Restart=on-failure: a clean exit stays down
                    if entry.restarted:
                        continue  # `systemctl restart`: at once
                self._stop.wait(self.restart_s)
        finally:
            self.exited.set()
            if self.log:
                out.close()  # type: ignore[union-attr]

    @property
    def restart_file(self) -> Path:
        """Touching this file is this supervisor's ``systemctl restart lepton-agent``."""
        return self.root.parent / "restart-agent"

    def _wait(self, proc: subprocess.Popen[bytes]) -> int:
        while True:
            try:
                return proc.wait(timeout=0.1)
            except subprocess.TimeoutExpired:
                pass
            if self.restart_file.exists():
                self.restart_file.unlink()
                self.starts[-1].restarted = True
                proc.send_signal(signal.SIGTERM)
                return proc.wait(timeout=30)

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        with self._lock:
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
        self._thread.join(timeout)


def service_command(root: Path, state_dir: Path) -> list[str]:
    """The shipped lepton-update.service's ExecStart, for ``root`` and ``state_dir``."""
    unit = REPO / "deploy/systemd/lepton-update.service"
    for line in unit.read_text().splitlines():
        if line.startswith("ExecStart="):
            value = line.partition("=")[2].replace("/opt/lepton", str(root))
            return shlex.split(value.replace("/var/lib/lepton", str(state_dir)))
    raise AssertionError("lepton-update.service has no ExecStart=")


@dataclass
class PathUnit:
    """lepton-update.path + .service: run the service's ExecStart whenever request.json or
    health.json exists (polled; systemd uses inotify), one run at a time (oneshot)."""

    root: Path
    state_dir: Path
    env: dict[str, str]
    restart_command: str
    log: Path | None = None
    runs: int = 0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="path-unit", daemon=True)

    def start(self) -> PathUnit:
        self._thread.start()
        return self

    def _loop(self) -> None:
        cmd = [*service_command(self.root, self.state_dir)]
        cmd += ["--restart-command", self.restart_command]
        watched = [self.state_dir / "update" / n for n in ("request.json", "health.json")]
        while not self._stop.wait(0.1):
            if any(p.exists() for p in watched):
                out = self.log.open("ab") if self.log else subprocess.DEVNULL
                try:
                    subprocess.run(cmd, env=self.env, stdout=out, stderr=out, timeout=600,
                                   check=False)  # fmt: skip
                finally:
                    if self.log:
                        out.close()  # type: ignore[union-attr]
                self.runs += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)
