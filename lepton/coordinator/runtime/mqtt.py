"""The coordinator's MQTT connection: paho's network thread, bridged to asyncio.

Why paho's own thread rather than aiomqtt (measured, see docs/BENCHMARKS.md): aiomqtt hands
every message to the event loop through a queue read by a fresh task per message, which
reached about a fifth of a bare paho subscriber's rate on the capacity stream. Here the
network thread parses packets and calls ``on_message`` directly (the ingest decodes and
buffers there), so the high-volume capacity stream never wakes the event loop per message;
paho reconnects on its own with capped backoff and re-subscribes in ``on_connect``.

Sessions: a lone coordinator keeps a persistent session (results queued by the broker while
it restarts are delivered when it is back). With shared subscriptions the session is clean,
so a dead replica's session does not hold on to messages meant for the group; agents re-send
unacknowledged results, so nothing is lost either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from lepton.common.tls import client_context
from lepton.coordinator.config import MqttConfig
from lepton.coordinator.errors import UnavailableError

log = logging.getLogger(__name__)
_paho_log = logging.getLogger("lepton.coordinator.runtime.mqtt.paho")


def _drop_not_connected(record: logging.LogRecord) -> bool:
    # paho's network thread logs "Client is not connected" at ERROR on every pass while it is
    # between connections and while it winds down after disconnect(); the link reports
    # connection changes itself, once each.
    return "Client is not connected" not in record.getMessage()


_paho_log.addFilter(_drop_not_connected)

OnMessage = Callable[[str, bytes, bool], None]
OnRouted = Callable[[bytes], None]


class MqttLink:
    """One broker connection for the lifetime of an ``async with`` block.

    ``on_message(topic, payload, retained)`` runs in paho's network thread and must be quick
    and must not raise. ``publish`` is awaited from the event loop: it returns once the broker
    acknowledged a QoS 1 message, or raises :class:`UnavailableError`.

    :meth:`add_route` gives one exact topic its own handler (a reply topic, say): its messages
    skip ``on_message``, so request/response exchanges share this connection without touching
    the ingest.
    """

    def __init__(
        self,
        cfg: MqttConfig,
        *,
        client_id: str,
        subscriptions: Sequence[tuple[str, int]],
        on_message: OnMessage,
        on_connection: Callable[[bool], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.client_id = client_id
        self.subscriptions = list(subscriptions)
        self._on_message_cb = on_message
        self._on_connection = on_connection
        self._v5 = cfg.protocol == "5"
        self._persistent = not cfg.shared_subscriptions
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connected = asyncio.Event()
        self._pending: dict[int, asyncio.Future[None]] = {}  # touched in the event loop only
        # Replaced, never mutated: the network thread reads it without a lock.
        self._routes: dict[str, tuple[int, OnRouted]] = {}
        self._failures = 0
        self._client = self._make_client()

    # ------------------------------------------------------------------ lifecycle

    def _make_client(self) -> paho.Client:
        cfg = self.cfg
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=paho.MQTTv5 if self._v5 else paho.MQTTv311,
            clean_session=None if self._v5 else not self._persistent,
        )
        if cfg.username:
            client.username_pw_set(cfg.username, cfg.password or None)
        if cfg.tls:
            # The broker must prove it is cfg.host to cfg.ca_file (else the system's CAs).
            client.tls_set_context(
                client_context(
                    cfg.ca_file or None, cfg.cert_file or None, cfg.key_file or None, what="mqtt"
                )
            )
        client.reconnect_delay_set(
            min_delay=max(1, round(cfg.reconnect_min_s)),
            max_delay=max(1, round(cfg.reconnect_max_s)),
        )
        client.max_inflight_messages_set(100)
        client.max_queued_messages_set(0)
        client.suppress_exceptions = True
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.enable_logger(_paho_log)
        return client

    async def __aenter__(self) -> MqttLink:
        self._loop = asyncio.get_running_loop()
        props: Properties | None = None
        clean_start: bool = not self._persistent
        if self._v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = self.cfg.session_expiry_s if self._persistent else 0
        self._client.connect_async(
            self.cfg.host,
            self.cfg.port,
            keepalive=self.cfg.keepalive_s,
            clean_start=clean_start if self._v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
            properties=props,
        )
        self._client.loop_start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._client.disconnect()
        await asyncio.to_thread(self._client.loop_stop)
        self._connected.clear()
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(UnavailableError("broker", "connection closed"))

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self, timeout: float | None = None) -> bool:
        """Wait until connected (and subscribed); False on timeout."""
        try:
            async with asyncio.timeout(timeout):
                await self._connected.wait()
        except TimeoutError:
            return False
        return True

    def add_route(self, topic: str, handler: OnRouted, *, qos: int = 1) -> None:
        """Subscribe to the exact ``topic`` (now if connected, and on every reconnect) and hand
        its payloads to ``handler`` in paho's network thread, instead of ``on_message``.
        ``handler`` must be quick and thread-safe. Adding a topic again replaces its handler.
        Keep route topics outside the link's subscriptions: the broker delivers a message
        once per matching subscription, so an overlap reaches the handler twice."""
        if "+" in topic or "#" in topic:
            raise ValueError(f"a route is one exact topic, not a filter: {topic!r}")
        self._routes = {**self._routes, topic: (qos, handler)}
        if self._connected.is_set():
            self._client.subscribe(topic, qos)

    # ------------------------------------------------------------------ publishing

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None:
        """Publish; for QoS 1 wait for the broker's PUBACK (``publish_timeout_s`` at most)."""
        if not self._connected.is_set():
            raise UnavailableError("broker", "not connected")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise UnavailableError("broker", paho.error_string(info.rc))
        if qos == 0:
            return
        # Registered before this loop step ends; the PUBACK callback reaches the loop only
        # through call_soon_threadsafe, so it always finds the future.
        self._pending[info.mid] = fut
        try:
            async with asyncio.timeout(self.cfg.publish_timeout_s):
                await fut
        except TimeoutError:
            raise UnavailableError(
                "broker", f"no PUBACK within {self.cfg.publish_timeout_s}s"
            ) from None
        finally:
            if self._pending.get(info.mid) is fut:
                del self._pending[info.mid]

    # ------------------------------------------------------------------ paho callbacks
    # (network thread)

    def _call(self, fn: Callable[..., Any], *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(fn, *args)

    def _on_connect(
        self, client: paho.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        if reason.is_failure:
            log.warning("broker refused the connection: %s", reason)
            return
        self._failures = 0
        wanted = [*self.subscriptions, *((t, q) for t, (q, _) in self._routes.items())]
        if wanted:
            client.subscribe(wanted)
        log.info(
            "connected to mqtt://%s:%d as %s (%d subscriptions)",
            self.cfg.host,
            self.cfg.port,
            self.client_id,
            len(self.subscriptions),
        )
        self._call(self._set_connected, True)

    def _on_connect_fail(self, _client: paho.Client, _userdata: Any) -> None:
        self._failures += 1
        level = (
            logging.WARNING
            if self._failures in (1, 10) or self._failures % 100 == 0
            else logging.DEBUG
        )
        log.log(
            level,
            "cannot connect to mqtt://%s:%d (attempt %d); retrying with backoff",
            self.cfg.host,
            self.cfg.port,
            self._failures,
        )

    def _on_disconnect(
        self, _client: paho.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        failure = getattr(reason, "is_failure", True)
        log.log(
            logging.WARNING if failure else logging.INFO, "disconnected from the broker: %s", reason
        )
        self._call(self._set_connected, False)

    def _set_connected(self, value: bool) -> None:
        if value:
            self._connected.set()
        else:
            self._connected.clear()
        if self._on_connection is not None:
            self._on_connection(value)

    def _on_message(self, _client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        topic = msg.topic  # paho decodes it on each access
        try:
            route = self._routes.get(topic) if self._routes else None
            if route is not None:
                route[1](bytes(msg.payload))
                return
            self._on_message_cb(topic, bytes(msg.payload), bool(msg.retain))
        except Exception:
            log.exception("message handler failed on %s", msg.topic)

    def _on_publish(
        self, _client: paho.Client, _userdata: Any, mid: int, _reason: Any, _props: Any
    ) -> None:
        # Never take a lock here: paho calls this holding its outgoing-message mutex.
        self._call(self._published, mid)

    def _published(self, mid: int) -> None:  # event loop
        fut = self._pending.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(None)
