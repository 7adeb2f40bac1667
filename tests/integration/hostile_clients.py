"""What the hostile-fleet campaign attacks with and how it keeps score: an MQTT client over
TLS that records every answer of the broker (CONNACK, SUBACK, PUBACK reason codes), an
observer that sees every topic, a digest of the stored tables, and the table of figures."""

from __future__ import annotations

import hashlib
import json
import ssl
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import Engine, MetaData, select

MARK = b"HOSTILE"

#: Tables a refused attempt must leave as they were, and the columns left out of the
#: digest, with why: each is written by something other than the attack while it runs.
DIGEST_PREFIXES = ("tasks", "task_", "devices", "fl_", "model_", "auth_tokens", "auth_devices")
DIGEST_TABLES = ("auth_claims", "results")
SKIP_COLUMNS = {
    # The guard stamps the use of the good tokens the test itself polls with.
    "auth_tokens": {"last_used_at"},
    # The three live agents report their capacity every second (liveness, not the attack).
    "devices": {"last_seen", "report", "report_ts", "report_interval_s", "reports"},
}
SKIP_TABLES = {"capacity_history"}  # the same periodic reports, one row each


def digest(engine: Engine) -> dict[str, str]:
    """Per table, a SHA-256 of its rows (sorted), the columns in SKIP_COLUMNS left out."""
    meta = MetaData()
    meta.reflect(engine)
    out: dict[str, str] = {}
    with engine.connect() as conn:
        for name, table in sorted(meta.tables.items()):
            wanted = name.startswith(DIGEST_PREFIXES) or name in DIGEST_TABLES
            if not wanted or name in SKIP_TABLES:
                continue
            cols = [c for c in table.columns if c.name not in SKIP_COLUMNS.get(name, set())]
            rows = sorted(json.dumps(list(r), default=str) for r in conn.execute(select(*cols)))
            out[name] = hashlib.sha256("\n".join(rows).encode()).hexdigest()
    return out


class MqttClient:
    """One paho MQTT 5 client over TLS, never reconnecting on its own; every broker answer
    is kept (``refused`` for the CONNACK, ``suback`` and ``puback`` reason codes)."""

    def __init__(
        self, port: int, tls: ssl.SSLContext, username: str, password: str, client_id: str = ""
    ) -> None:
        self.port = port
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or username,
            protocol=paho.MQTTv5,
            reconnect_on_failure=False,
        )
        self.client.tls_set_context(tls)
        self.client.username_pw_set(username, password)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message
        self.answered = threading.Event()
        self.refused: str | None = None
        self.gone = threading.Event()
        self.received: list[tuple[str, bytes]] = []
        self._suback: list[int] = []
        self._subacked = threading.Event()
        self._pubacks: dict[int, int] = {}
        self._lock = threading.Lock()

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.refused = str(reason) if reason.is_failure else None
        self.answered.set()

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, _reason: Any, _p: Any) -> None:
        self.gone.set()
        self.answered.set()

    def _on_subscribe(self, _c: Any, _u: Any, _mid: Any, codes: Any, _p: Any) -> None:
        self._suback = [c.value for c in codes]
        self._subacked.set()

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        with self._lock:
            self._pubacks[mid] = reason.value

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        self.received.append((msg.topic, bytes(msg.payload)))

    def connect(self, timeout: float = 5) -> bool:
        """True once the broker accepted the connection; False if it refused or dropped it."""
        self.answered.clear()
        self.gone.clear()
        self.client.connect("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()
        assert self.answered.wait(timeout), "no CONNACK"
        return self.refused is None and not self.gone.is_set()

    def subscribe(self, filt: str) -> int:
        """The SUBACK's reason code (>= 0x80: refused)."""
        self._subacked.clear()
        self.client.subscribe(filt, qos=1)
        assert self._subacked.wait(5), "no SUBACK"
        return self._suback[0]

    def publish(self, topic: str, payload: bytes) -> str:
        """``puback:0xNN`` (the broker's answer to a QoS 1 publish) or ``disconnected``."""
        info = self.client.publish(topic, payload, qos=1)
        try:
            info.wait_for_publish(5)
        except (RuntimeError, ValueError):
            return "disconnected"
        if self.gone.is_set() or not info.is_published():
            return "disconnected"
        with self._lock:
            return f"puback:0x{self._pubacks.pop(info.mid, 0):02x}"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class Row:
    attempts: int = 0
    refused: int = 0
    reasons: Counter[str] = field(default_factory=Counter)


@dataclass
class Score:
    """Attack -> attempts, refused, reasons; printed as one table."""

    rows: dict[str, Row] = field(default_factory=dict)

    def add(self, attack: str, refused: bool, reason: str) -> None:
        row = self.rows.setdefault(attack, Row())
        row.attempts += 1
        row.refused += int(refused)
        row.reasons[reason] += 1

    def add_many(self, attack: str, n: int, reason: str) -> None:
        """``n`` refused attempts of one reason (read from a counter)."""
        row = self.rows.setdefault(attack, Row())
        row.attempts += n
        row.refused += n
        row.reasons[reason] += n

    def table(self) -> str:
        lines = ["| attack | attempts | refused | reason(s) |", "|---|---:|---:|---|"]
        for attack, row in self.rows.items():
            why = ", ".join(f"{r} x{n}" for r, n in row.reasons.most_common())
            lines.append(f"| {attack} | {row.attempts} | {row.refused} | {why} |")
        total = sum(r.attempts for r in self.rows.values())
        refused = sum(r.refused for r in self.rows.values())
        lines.append(f"| **total** | **{total}** | **{refused}** | |")
        return "\n".join(lines)
