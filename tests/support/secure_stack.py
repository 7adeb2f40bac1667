"""The shipped secure configuration, booted for real on free ports: a fleet CA from
``lepton ca init``, a Mosquitto running exactly what ``lepton broker init`` wrote (the
dynamic security plugin, a TLS listener with the CA's server certificate), a coordinator on
that TLS listener as the coordinator account with ``mqtt.accounts = "dynsec"``, serving
HTTPS, handing the CA to devices (``auth.ca_file``), and agents enrolled with the real
``lepton-agent enroll`` over HTTPS.

``async with secure_stack(tmp_path) as s:`` gives :class:`SecureStack`; ``s.agent(id)``
enrols and starts one ``lepton-agent run`` process (killed at the end).

One addition to the broker's files, made before it starts: an ``observer`` account whose
role may read everything (``#``), for tests that must see whether a message got through.
It cannot be the coordinator's account: ``use_username_as_clientid`` makes a second login
with that name take the coordinator's session over.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import io
import json
import secrets
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from lepton.common.tls import client_context
from lepton.coordinator.auth.broker_config import password_hash
from lepton.coordinator.cli.main import main
from lepton.coordinator.service import Coordinator
from lepton.protocol import routes
from tests.coordinator.auth.enrolling import bearer, make_claims, operator_token
from tests.coordinator.conftest import coordinator_config
from tests.support.agents import AgentProcess, enrol_agent, write_agent_config
from tests.support.broker import Broker, free_port

FLEET = "f1"
OBSERVER = "observer"


@dataclass
class InitBroker(Broker):
    """Runs the mosquitto.conf that ``lepton broker init`` wrote into ``workdir``, as is."""

    def write_config(self) -> None:
        pass


def listener_port(folder: Path) -> int:
    """The first listener's port in the ``mosquitto.conf`` of ``folder``."""
    for line in (folder / "mosquitto.conf").read_text().splitlines():
        if line.startswith("listener "):
            return int(line.split()[1])
    raise AssertionError("no listener in mosquitto.conf")


def add_observer(folder: Path, password: str) -> None:
    """An account that reads every topic (and publishes nothing), for a test's eyes only."""
    path = folder / "dynamic-security.json"
    data: dict[str, Any] = json.loads(path.read_text())
    data["roles"].append(
        {
            "rolename": "test-observer",
            "acls": [
                {"acltype": "subscribePattern", "topic": "#", "priority": 0, "allow": True},
                {"acltype": "publishClientReceive", "topic": "#", "priority": 0, "allow": True},
            ],
        }
    )
    data["clients"].append(
        {
            "username": OBSERVER,
            **password_hash(password),
            "roles": [{"rolename": "test-observer"}],
        }
    )
    path.write_text(json.dumps(data))


@dataclass
class SecureStack:
    """A running secure fleet; see the module docstring."""

    tmp: Path
    ca_file: Path
    broker: InitBroker
    tls_port: int
    observer_password: str
    coordinator: Coordinator
    api: httpx.AsyncClient  # HTTPS, verifying the fleet CA, no token of its own
    admin: str  # an admin operator token
    agents: dict[str, AgentProcess] = field(default_factory=dict)

    @property
    def url(self) -> str:
        assert self.coordinator.api_url is not None
        return str(self.coordinator.api_url)

    def tls(self) -> ssl.SSLContext:
        return client_context(self.ca_file)

    async def claim(self, **body: Any) -> str:
        (claim,) = await make_claims(self.api, self.admin, **body)
        token: str = claim["token"]
        return token

    async def agent(self, device_id: str) -> AgentProcess:
        """Enrol ``device_id`` with ``lepton-agent enroll URL CLAIM --ca-file`` and start it."""
        cfg = write_agent_config(
            self.tmp / f"{device_id}.toml",
            device_id=device_id,
            port=self.tls_port,
            state_dir=self.tmp / device_id,
            agent={"slots": 2},
        )
        claim = await self.claim()
        done = await asyncio.to_thread(  # the coordinator answers in this event loop
            enrol_agent,
            cfg,
            self.url,
            claim,
            device_id=device_id,
            args=("--ca-file", str(self.ca_file)),
        )
        assert done.returncode == 0, done.stdout + done.stderr
        proc = AgentProcess(config_path=cfg, log_path=self.tmp / f"{device_id}.log")
        proc.start()
        self.agents[device_id] = proc
        return proc

    async def online(self, device_id: str) -> bool:
        r = await self.api.get(
            routes.path(routes.DEVICE, device_id=device_id), headers=bearer(self.admin)
        )
        return r.status_code == 200 and r.json()["state"] == "online"


def _cli(*args: str) -> None:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert main(list(args)) == 0, (args, out.getvalue())


@contextlib.asynccontextmanager
async def secure_stack(tmp: Path, **overrides: Any) -> AsyncIterator[SecureStack]:
    """Boot CA, broker, coordinator (``overrides`` go to its config) and yield the stack."""
    pki, bdir = tmp / "pki", tmp / "broker"
    _cli("ca", "init", "--dir", str(pki))
    tls_port = free_port()
    _cli(
        *("broker", "init", "--dir", str(bdir), "--fleet", FLEET),
        *("--port", str(free_port()), "--run-as", getpass.getuser()),
        *("--tls-port", str(tls_port), "--cafile", str(pki / "ca.crt")),
        *("--certfile", str(pki / "server.crt"), "--keyfile", str(pki / "server.key")),
    )
    observer_password = secrets.token_urlsafe(16)
    add_observer(bdir, observer_password)
    broker = InitBroker(workdir=bdir, port=listener_port(bdir))
    broker.start()
    agents: dict[str, AgentProcess] = {}
    try:
        cfg = coordinator_config(
            tmp,
            tls_port,
            fleet=FLEET,
            mqtt__tls=True,
            mqtt__ca_file=str(pki / "ca.crt"),
            mqtt__username="coordinator",
            mqtt__password=(bdir / "coordinator.password").read_text().strip(),
            mqtt__accounts="dynsec",
            http__host="127.0.0.1",
            http__tls_cert_file=str(pki / "server.crt"),
            http__tls_key_file=str(pki / "server.key"),
            auth__ca_file=str(pki / "ca.crt"),
            auth__device_mqtt_host="127.0.0.1",
            auth__device_mqtt_port=tls_port,
            auth__device_mqtt_tls=True,
            **overrides,
        )
        async with Coordinator(cfg) as c:
            assert await c.link.wait_connected(10), "coordinator did not reach the TLS listener"
            assert str(c.api_url).startswith("https://"), c.api_url
            async with httpx.AsyncClient(
                base_url=str(c.api_url), verify=client_context(pki / "ca.crt"), timeout=15
            ) as api:
                stack = SecureStack(
                    tmp,
                    pki / "ca.crt",
                    broker,
                    tls_port,
                    observer_password,
                    c,
                    api,
                    operator_token(c),
                    agents,
                )
                yield stack
    finally:
        for proc in agents.values():
            proc.kill()
        broker.kill()
