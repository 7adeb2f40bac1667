"""The security the demo ran with, measured from the running system, never assumed from
what the demo asked for.

- HTTP: a TLS handshake with the coordinator's API, verified with the fleet CA (version,
  cipher), and a call without a token that must be refused (its status).
- MQTT: a TLS handshake with the broker's device listener, verified with the fleet CA; the
  listeners in the broker's configuration, and whether each has a certificate.
- Enrolment: the coordinator's ``auth_devices`` rows (devices holding a device token), read
  from its database; the broker accounts in the dynamic security plugin's saved state (the
  plugin rewrites ``dynamic-security.json`` on every change) that belong to those devices.
- Operator tokens: the live rows of ``auth_tokens``.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import ssl
from pathlib import Path
from typing import Any

import httpx

from lepton.demo.stack import NOT_ISOLATED, Stack
from lepton.demo.trust import COORDINATOR_USER
from lepton.protocol import routes


def handshake(port: int, context: ssl.SSLContext, host: str = "127.0.0.1") -> dict[str, Any]:
    """A verified TLS handshake with ``host:port``: ``{"ok", "version", "cipher"}``, or
    ``{"ok": False, "error"}`` (a plain listener, a certificate the CA did not sign)."""
    try:
        with (
            socket.create_connection((host, port), timeout=5.0) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            cipher = tls.cipher()
            return {"ok": True, "version": tls.version(), "cipher": cipher[0] if cipher else None}
    except (OSError, ssl.SSLError) as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


def broker_listeners(conf: Path | None) -> list[dict[str, Any]]:
    """Each ``listener`` of a Mosquitto configuration: its port, address and whether it has
    a certificate (TLS). None (the embedded broker's): []."""
    if conf is None:
        return []
    out: list[dict[str, Any]] = []
    for line in conf.read_text().splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "listener":
            out.append(
                {"port": int(words[1]), "bind": words[2] if len(words) > 2 else "", "tls": False}
            )
        elif words[0] == "certfile" and out:
            out[-1]["tls"] = True
    return out


def _rows(database: Path, sql: str) -> list[tuple[Any, ...]]:
    # Read-only: the coordinator owns the database; the demo only looks.
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5.0) as db:
        return list(db.execute(sql).fetchall())


def broker_accounts(dynsec: Path | None) -> list[str]:
    """Usernames of the device accounts in the plugin's saved state (all but the
    coordinator's)."""
    if dynsec is None or not dynsec.exists():
        return []
    clients = json.loads(dynsec.read_text()).get("clients", [])
    return sorted(c["username"] for c in clients if c.get("username") != COORDINATOR_USER)


def measure(stack: Stack) -> dict[str, Any]:
    """The posture of ``stack`` now (see the module doc); JSON-ready."""
    assert stack.broker is not None
    assert stack.trust is not None
    with httpx.Client(base_url=stack.api_url, timeout=10.0, verify=stack.verify) as http:
        anonymous = http.get(routes.DEVICES).status_code
    database = stack.data_dir / "coordinator.db"
    enrolled = [
        str(r[0])
        for r in _rows(database, "SELECT device_id FROM auth_devices WHERE revoked_at IS NULL")
    ]
    operators = _rows(database, "SELECT count(*) FROM auth_tokens WHERE revoked_at IS NULL")
    accounts = broker_accounts(stack.trust.dynsec_file)
    mqtt = handshake(stack.broker.port, stack.verify) if stack.broker.tls else {"ok": False}
    return {
        "http": {
            "url": stack.api_url,
            "tls": handshake(stack.http_port, stack.verify),
            "without_token": anonymous,
        },
        "mqtt": {
            "broker": stack.broker.describe(),
            "port": stack.broker.port,
            "tls": mqtt,
            "listeners": broker_listeners(stack.trust.broker_conf),
        },
        "devices_enrolled": len(enrolled),
        "device_accounts": len(set(accounts) & set(enrolled)),
        "isolated": stack.isolated,
        "warning": None if stack.isolated else NOT_ISOLATED,
        "operator_tokens": int(operators[0][0]),
        "ca_file": str(stack.trust.ca_file),
    }
