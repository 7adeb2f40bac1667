"""The demo's processes: a broker, a coordinator and a simulated fleet, each on its own, with
the security a real fleet runs with.

:class:`Stack` makes the fleet's trust first (a CA, and the broker's configuration: see
:mod:`lepton.demo.trust`), then starts the processes in order: Mosquitto with the dynamic
security plugin on a TLS listener; the coordinator on SQLite in the work directory, over MQTT
TLS as the ``coordinator`` account, serving HTTPS, with the CA to sign devices' certificates;
``lepton-sim``, whose devices each enrol with one multi-use claim (their own broker account
and device token) and connect over TLS. Every HTTP call verifies the fleet CA and carries a
token. Without Mosquitto the embedded broker runs instead: no broker accounts and no MQTT
TLS there (devices are not isolated), but tokens, enrolment and HTTPS stay on.

It waits until each process is ready, and :meth:`Stack.close` stops them in the
reverse order: fleet first (agents publish their offline state), then the coordinator
(drains what it received), then the broker. Every child runs in its own process group and
dies with the demo (see :mod:`lepton.demo.procs`); their PIDs are written to
``pids.json`` in the work directory and their output to ``logs/``.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from lepton.common.errors import LeptonError
from lepton.common.tls import client_context
from lepton.demo import procs
from lepton.demo.broker import (
    BrokerChoice,
    EmbeddedBroker,
    MosquittoBroker,
    free_port,
    pick_broker,
    start_broker,
)
from lepton.demo.trust import COORDINATOR_USER, Trust, make_trust
from lepton.protocol import routes

log = logging.getLogger(__name__)

DEFAULT_MIX = "rpi4=0.4,rpi5=0.3,jetson-orin-nano=0.1,x86-gateway=0.2"
FLEET = "default"  # the coordinator's fleet, and the one the broker's configuration is for
#: What the demo prints (and reports) when the broker cannot isolate devices.
NOT_ISOLATED = "devices are not isolated on this broker; install mosquitto"


class StackError(LeptonError, RuntimeError):
    """A process of the stack failed to start or died."""


@dataclass(frozen=True, slots=True, kw_only=True)
class StackSpec:
    """What to start. ``host_gflops`` None: the simulator measures this host once."""

    workdir: Path
    devices: int = 20
    broker: BrokerChoice = "auto"
    profile_mix: str = DEFAULT_MIX
    seed: int = 0
    capacity_interval_s: float = 2.0
    host_gflops: float | None = None
    data: str | None = "digits"  # what every device holds (None: nothing)
    fleet_processes: int = 1  # simulator processes the devices are split across
    tuned: bool = True  # DEMO_SETTINGS on top of the coordinator's defaults
    # Mosquitto with an account per client and TLS (the dynamic security plugin); False: a
    # plain anonymous Mosquitto, as the embedded broker (for a benchmark's bare observer).
    broker_accounts: bool = True
    coordinator_settings: dict[str, Any] = field(default_factory=dict)
    # More ``lepton-sim`` flags for every simulator process (``--release-root``...).
    sim_flags: tuple[str, ...] = ()


# Settings that make a small local fleet feel immediate (the defaults suit a real fleet).
DEMO_SETTINGS: dict[str, Any] = {
    "database.sqlite_synchronous": "normal",
    "registry.flush_interval_s": 0.1,
    "scheduler.batch_interval_s": 0.2,
    "scheduler.time_budget_s": 0.5,
    "tasks.retry_backoff_s": 0.5,
    "tasks.retry_backoff_max_s": 5.0,
    "liveness.max_check_s": 1.0,
}


class Stack:
    """Broker, coordinator and fleet processes. ``with Stack(spec) as s: s.start()``."""

    def __init__(self, spec: StackSpec) -> None:
        self.spec = spec
        self.workdir = spec.workdir.resolve()
        self.logs = self.workdir / "logs"
        self.broker: MosquittoBroker | EmbeddedBroker | None = None
        self.coordinator: subprocess.Popen[bytes] | None = None
        self.fleets: list[subprocess.Popen[bytes]] = []
        self.http_port = 0
        #: The fleet CA and the broker's configuration, made by start_broker.
        self.trust: Trust | None = None
        #: The demo's operator token (scope admin), made once the coordinator runs.
        self.token: str | None = None
        #: The multi-use claim the simulated devices enrol with (start_fleet makes it).
        self.claim: str | None = None
        self._verify: ssl.SSLContext | None = None
        self.closed = False

    # ------------------------------------------------------------------ paths

    @property
    def data_dir(self) -> Path:
        return self.workdir / "coordinator"

    @property
    def database_url(self) -> str:
        return f"sqlite:///{self.data_dir / 'coordinator.db'}"

    @property
    def token_file(self) -> Path:
        """Where the demo keeps its operator token (0600), for ``lepton`` while it runs."""
        return self.workdir / "token"

    @property
    def headers(self) -> dict[str, str]:
        """The ``Authorization`` header every call to the coordinator's API carries."""
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    @property
    def fleet_root(self) -> Path:
        return self.workdir / "fleet"

    @property
    def api_url(self) -> str:
        """The coordinator's API: HTTPS, its certificate signed by the fleet CA."""
        return f"https://127.0.0.1:{self.http_port}"

    @property
    def ca_file(self) -> Path:
        assert self.trust is not None, "start the broker first"
        return self.trust.ca_file

    @property
    def verify(self) -> ssl.SSLContext:
        """What every HTTP client of the demo verifies the coordinator with: the fleet CA
        only, host name checked."""
        if self._verify is None:
            self._verify = client_context(self.ca_file, what="the demo's fleet CA")
        return self._verify

    @property
    def isolated(self) -> bool:
        """Whether the broker gives each client its own account (Mosquitto with dynsec)."""
        return self.broker is not None and self.broker.accounts

    def pids(self) -> dict[str, int]:
        """PIDs of the processes started so far (broker, coordinator, fleet)."""
        out: dict[str, int] = {}
        if self.broker is not None and self.broker.pid is not None:
            out["broker"] = self.broker.pid
        if self.coordinator is not None:
            out["coordinator"] = self.coordinator.pid
        for i, proc in enumerate(self.fleets):
            out["fleet" if i == 0 else f"fleet-{i + 1}"] = proc.pid
        return out

    def _write_pids(self) -> None:
        (self.workdir / "pids.json").write_text(
            json.dumps({"demo": os.getpid(), **self.pids()}, indent=2) + "\n"
        )

    # ------------------------------------------------------------------ start

    def __enter__(self) -> Stack:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start_broker(self) -> str:
        """Make the fleet's trust (:mod:`lepton.demo.trust`) and start the broker on it;
        returns what runs (``mosquitto on 127.0.0.1:P (TLS, ...)``...)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        mosquitto = pick_broker(self.spec.broker) == "mosquitto"
        tls_port = free_port() if mosquitto and self.spec.broker_accounts else None
        self.trust = make_trust(
            self.workdir,
            fleet=FLEET,
            tls_port=tls_port,
            env=_child_env(),
            log=self.logs / "trust.log",
        )
        self.broker = start_broker(
            self.workdir / "broker",
            "mosquitto" if mosquitto else "embedded",
            prepared=self.trust.broker_conf,
            port=tls_port,
        )
        self._write_pids()
        described = self.broker.describe()
        return described if self.isolated else f"{described}: {NOT_ISOLATED}"

    def start_coordinator(self, timeout: float = 60.0) -> dict[str, Any]:
        """Start ``lepton coordinator run`` and wait until its health says ok."""
        assert self.broker is not None, "start the broker first"
        assert self.trust is not None
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.http_port = free_port()
        trust, tls = self.trust, self.broker.tls
        settings = {
            **(DEMO_SETTINGS if self.spec.tuned else {}),
            "mqtt.protocol": self.broker.mqtt_protocol,
            **self._mqtt_settings(),
            "http.tls_cert_file": trust.server_cert,
            "http.tls_key_file": trust.server_key,
            "auth.ca_file": trust.ca_file,
            "auth.ca_key_file": trust.ca_key_file,
            # Devices are told this at enrolment: the same listener, by the name (an IP
            # address) the server certificate holds.
            "auth.device_mqtt_host": "127.0.0.1",
            "auth.device_mqtt_port": self.broker.port,
            "auth.device_mqtt_tls": tls,
            # The simulated fleet writes the federated stage's evaluation set there.
            "fl.eval_dir": self.fleet_root,
            **self.spec.coordinator_settings,
        }
        flags = {
            "--instance-id": "demo",
            "--fleet": FLEET,  # the fleet the broker's configuration confines it to
            "--data-dir": self.data_dir,
            "--mqtt-port": self.broker.port,
            "--http-port": self.http_port,
        }
        argv = [
            *(sys.executable, "-m", "lepton.coordinator.cli", "coordinator", "run"),
            *_flags(flags),
            *(arg for k, v in settings.items() for arg in ("--set", f"{k}={v}")),
        ]
        self.coordinator = procs.spawn(
            argv, log_path=self.logs / "coordinator.log", env=_child_env()
        )
        self._write_pids()
        health = self._wait_healthy(timeout)
        self.token = self._create_token()
        return health

    def _mqtt_settings(self) -> dict[str, Any]:
        """The coordinator's broker link: TLS as its own account on Mosquitto; anonymous on
        the embedded broker, which has neither accounts nor TLS."""
        assert self.trust is not None
        assert self.broker is not None
        if not self.isolated:
            return {"mqtt.accounts": "none"}
        return {
            "mqtt.accounts": "dynsec",
            "mqtt.username": COORDINATOR_USER,
            "mqtt.password_file": self.trust.password_file,
            "mqtt.tls": True,
            "mqtt.ca_file": self.trust.ca_file,
        }

    def _create_token(self) -> str:
        """An operator token for the demo itself, made as an operator makes one on the
        coordinator's host (``lepton tokens create --database``), kept in ``token_file``."""
        name = f"demo-{secrets.token_hex(4)}"  # a rerun in the same workdir wants a new name
        argv = [
            *(sys.executable, "-m", "lepton.coordinator.cli", "tokens", "create", name),
            *("--scope", "admin", "--database", self.database_url, "--json"),
        ]
        done = subprocess.run(
            argv, env=_child_env(), capture_output=True, text=True, timeout=60, check=False
        )
        if done.returncode != 0:
            raise StackError(f"lepton tokens create failed ({done.returncode}): {done.stderr}")
        token = str(json.loads(done.stdout)["token"])
        fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(token + "\n")
        return token

    def _wait_healthy(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        delay = 0.05
        last = "no answer"
        with httpx.Client(base_url=self.api_url, timeout=2.0, verify=self.verify) as http:
            while time.monotonic() < deadline:
                self.check_alive()
                try:
                    r = http.get(routes.HEALTH)
                    body = r.json()
                    if r.status_code == 200 and body.get("mqtt_connected"):
                        return dict(body)
                    last = f"{r.status_code} {body.get('status')}"
                except (httpx.TransportError, ValueError) as exc:
                    last = type(exc).__name__
                time.sleep(delay)
                delay = min(delay * 1.5, 0.5)
        raise StackError(f"the coordinator was not healthy within {timeout:g}s ({last})")

    def make_claim(self) -> str:
        """One enrolment claim good for every device of the fleet (``POST /v1/claims``)."""
        from lepton.demo.api import Api

        with Api(self.api_url, token=self.token, verify=self.verify) as api:
            return api.create_claim(uses=self.spec.devices)

    def start_fleet(self, host_gflops: float | None = None, claim: str | None = None) -> None:
        """Start ``lepton-sim``: ``devices`` virtual devices over ``fleet_processes``
        processes (ids numbered across them), holding ``data``. Each device enrols at start
        with ``claim`` (default: a claim made here for the whole fleet), verifying the
        coordinator with the fleet CA.

        ``host_gflops``: this host's speed the simulator stretches work against (default:
        the spec's, else the simulator's own probe)."""
        assert self.broker is not None, "start the broker first"
        s = self.spec
        self.claim = claim if claim is not None else self.make_claim()
        host = host_gflops if host_gflops is not None else s.host_gflops
        n = max(1, min(s.fleet_processes, s.devices))
        first = 0
        for i in range(n):
            count = s.devices // n + (1 if i < s.devices % n else 0)
            flags: dict[str, object] = {
                "--devices": count,
                "--first-index": first,
                "--profile-mix": s.profile_mix,
                "--broker-port": self.broker.port,
                "--state-root": self.fleet_root,
                "--seed": s.seed + i,
                "--capacity-interval": s.capacity_interval_s,
                "--log-level": "WARNING",
                "--enroll": self.api_url,
                "--claim": self.claim,
                "--ca-file": self.ca_file,
            }
            if s.data is not None:
                flags["--data"] = s.data
            if host is not None:
                flags["--host-gflops"] = round(host, 3)
            argv = [sys.executable, "-m", "lepton.sim", *_flags(flags), *s.sim_flags]
            log_path = self.logs / _fleet_log(i)
            self.fleets.append(procs.spawn(argv, log_path=log_path, env=_child_env()))
            first += count
        self._write_pids()

    def check_alive(self) -> None:
        """StackError naming the process (and its last log lines) if one has exited."""
        for name, proc, log_name in (
            ("coordinator", self.coordinator, "coordinator.log"),
            *(
                (f"fleet simulator {i + 1}", proc, _fleet_log(i))
                for i, proc in enumerate(self.fleets)
            ),
        ):
            if proc is not None and proc.poll() is not None:
                raise StackError(
                    f"the {name} exited with {proc.returncode}:\n{self.log_tail(log_name)}"
                )
        broker = self.broker
        if broker is not None and broker.proc is not None and broker.proc.poll() is not None:
            raise StackError(f"the broker exited with {broker.proc.returncode}")

    def log_tail(self, name: str, n: int = 15) -> str:
        try:
            return "\n".join((self.logs / name).read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    # ------------------------------------------------------------------ stop

    def close(self) -> None:
        """Stop fleet, coordinator and broker (in that order); safe to call twice."""
        if self.closed:
            return
        self.closed = True
        for proc in self.fleets:  # all at once: each drains its devices in parallel
            procs.signal_group(proc, signal.SIGTERM)
        for i, proc in enumerate(self.fleets):
            procs.stop_group(proc, timeout=60, name=f"fleet simulator {i + 1}")
        if self.coordinator is not None:
            procs.stop_group(self.coordinator, timeout=20, name="coordinator")
        if self.broker is not None:
            self.broker.stop()


def _fleet_log(i: int) -> str:
    return "fleet.log" if i == 0 else f"fleet-{i + 1}.log"


def _flags(flags: dict[str, object]) -> list[str]:
    return [str(x) for pair in flags.items() for x in pair]


def _child_env() -> dict[str, str]:
    """This environment without ``LEPTON_*`` settings meant for other processes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEPTON_")}
    env.setdefault("PYTHONUNBUFFERED", "1")
    # Two cores shared by many processes: one math thread each keeps them from fighting.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env.setdefault(var, "1")
    return env
