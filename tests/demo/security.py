"""What the demo's security is, read from the system itself: the coordinator's database, the
broker's configuration and saved accounts, the devices' identity files, and real MQTT and
HTTP connections (never from the demo's own report)."""

from __future__ import annotations

import json
import sqlite3
import ssl
import threading
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion


def rows(workdir: Path, sql: str) -> list[tuple[Any, ...]]:
    """Rows of the demo coordinator's SQLite database (read-only)."""
    db = workdir / "coordinator" / "coordinator.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return list(conn.execute(sql).fetchall())


def enrolled(workdir: Path) -> dict[str, str]:
    """Enrolled, unrevoked devices: device id -> the claim it enrolled with."""
    return dict(rows(workdir, "SELECT device_id, claim FROM auth_devices WHERE revoked_at IS NULL"))


def identities(workdir: Path) -> dict[str, dict[str, Any]]:
    """Each simulated device's identity.json (what enrolment gave it)."""
    return {
        p.parent.name: json.loads(p.read_text())
        for p in sorted((workdir / "fleet").glob("*/identity.json"))
    }


def listeners(conf: Path) -> list[dict[str, Any]]:
    """The listeners of a mosquitto.conf, each with the options that follow it."""
    out: list[dict[str, Any]] = []
    for line in conf.read_text().splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "listener":
            out.append({"port": int(words[1]), "bind": words[2:], "options": {}})
        elif out:
            out[-1]["options"][words[0]] = " ".join(words[1:])
    return out


def broker_usernames(workdir: Path) -> set[str]:
    """Accounts in the dynamic security plugin's saved state."""
    doc = json.loads((workdir / "broker" / "dynamic-security.json").read_text())
    return {c["username"] for c in doc["clients"]}


def mqtt_connect(
    port: int, username: str, password: str, ca_file: Path | None, timeout: float = 5.0
) -> str:
    """Connect once: ``"accepted"``, ``"refused: REASON"`` or ``"no answer: WHY"`` (a plain
    client on a TLS port, a handshake that fails)."""
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"{username}",
        protocol=paho.MQTTv5,
        reconnect_on_failure=False,
    )
    client.username_pw_set(username, password)
    if ca_file is not None:
        client.tls_set(ca_certs=str(ca_file), tls_version=ssl.PROTOCOL_TLS_CLIENT)
    answered = threading.Event()
    result: list[str] = []

    def on_connect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        result.append(f"refused: {reason}" if reason.is_failure else "accepted")
        answered.set()

    client.on_connect = on_connect
    try:
        client.connect("127.0.0.1", port, keepalive=10)
    except (OSError, ssl.SSLError) as exc:
        return f"no answer: {type(exc).__name__}"
    client.loop_start()
    try:
        if not answered.wait(timeout):
            return "no answer: timeout"
        return result[0]
    finally:
        client.disconnect()
        client.loop_stop()


def plain_http_fails(api_url: str) -> bool:
    """True when plain HTTP to the API's port gets no HTTP answer (the port speaks TLS)."""
    plain = api_url.replace("https://", "http://", 1)
    try:
        httpx.get(plain + "/v1/health", timeout=5.0)
    except httpx.TransportError:
        return True
    return False
