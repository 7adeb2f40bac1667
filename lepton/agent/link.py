"""The agent's MQTT link: one connection at a time, reconnecting with capped, jittered backoff.

While connected it publishes the retained birth message, listens on the device's command
topics, and drains the outbox (re-sending everything unacknowledged after each reconnect and
anything unacknowledged for ``resend_after`` seconds). The Last Will marks the device offline
(retained) when the connection dies without a clean disconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable

import aiomqtt

from lepton.agent.config import AgentConfig
from lepton.agent.metrics import Counters
from lepton.agent.outbox import Outbox
from lepton.common.tls import client_context
from lepton.protocol import topics
from lepton.protocol.aio import cancel_and_wait
from lepton.protocol.codec import encode
from lepton.protocol.messages import State

log = logging.getLogger(__name__)

PUBLISH_BATCH = 500
PUBLISH_TIMEOUT_S = 30.0


class Backoff:
    """Exponential backoff with full jitter between ``low`` and a cap of ``high`` seconds."""

    def __init__(self, low: float, high: float) -> None:
        self.low = low
        self.high = high
        self.attempt = 0

    def next(self) -> float:
        cap = min(self.high, self.low * (2**self.attempt))
        self.attempt = min(self.attempt + 1, 32)
        return random.uniform(self.low, max(self.low, cap))

    def reset(self) -> None:
        self.attempt = 0


MessageHandler = Callable[[str, str, bytes], Awaitable[None]]


class Link:
    """The MQTT connection of one agent."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        outbox: Outbox,
        counters: Counters,
        birth: Callable[[], State],
        on_message: MessageHandler,
        on_connect: Callable[[], None] = lambda: None,
    ) -> None:
        self.config = config
        self._outbox = outbox
        self._counters = counters
        self._birth = birth
        self._on_message = on_message
        self._on_connect = on_connect
        self._client: aiomqtt.Client | None = None
        # Made once, here: unreadable TLS files stop the agent at start-up (ConfigError).
        # The broker must prove it is broker.host to broker.ca_file (else the system's CAs).
        b = config.broker
        self._tls = (
            client_context(b.ca_file, b.cert_file, b.key_file, what="broker") if b.tls else None
        )
        self.connected = asyncio.Event()
        self._wake = asyncio.Event()
        self._all_sent = asyncio.Event()
        self._backoff = Backoff(config.broker.reconnect_min_s, config.broker.reconnect_max_s)
        self._handler_slots = asyncio.Semaphore(256)
        self._handlers: set[asyncio.Task[None]] = set()
        fleet, dev = config.device.fleet, config.device.id
        self.state_topic = topics.device_topic(fleet, dev, topics.STATE)
        self.capacity_topic = topics.device_topic(fleet, dev, topics.CAPACITY)
        self.result_topic = topics.device_topic(fleet, dev, topics.RESULT)
        self.task_ack_topic = topics.device_topic(fleet, dev, topics.TASK_ACK)
        self.cmd_filter = topics.cmd_filter(fleet, dev)

    # ------------------------------------------------------------ public

    def wake(self) -> None:
        """New outbox entries are ready to publish."""
        self._wake.set()

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False
    ) -> bool:
        """Publish if connected; False (and counted) when not. For non-durable traffic only."""
        client = self._client
        if client is None or not self.connected.is_set():
            self._counters.inc("publish.dropped_offline")
            return False
        try:
            await client.publish(topic, payload, qos=qos, retain=retain, timeout=PUBLISH_TIMEOUT_S)
        except aiomqtt.MqttError as exc:
            self._counters.inc("publish.failed")
            log.debug("publish to %s failed: %s", topic, exc)
            return False
        return True

    async def run(self) -> None:
        """Connect, serve, reconnect; forever (until cancelled)."""
        while True:
            try:
                await self._session()
            except* aiomqtt.MqttError as group:
                self._counters.inc("link.disconnects")
                log.warning(
                    "broker connection lost: %s", "; ".join(str(e) for e in group.exceptions)
                )
            except* OSError as group:
                self._counters.inc("link.disconnects")
                log.warning("broker unreachable: %s", "; ".join(str(e) for e in group.exceptions))
            finally:
                self.connected.clear()
                self._client = None
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # Cancelled while the connection failed: aiomqtt's exit (or a child) raised
                # the connection error in place of the CancelledError. The cancel still
                # stands, so a link told to stop does not reconnect.
                raise asyncio.CancelledError
            delay = self._backoff.next()
            log.info("reconnecting in %.2f s", delay)
            await asyncio.sleep(delay)

    async def say_goodbye(self) -> None:
        """Clean shutdown: publish the retained offline state (a clean disconnect sends no will)."""
        goodbye = State(
            state="offline", reason="shutdown", agent_version=self._birth().agent_version
        )
        await self.publish(self.state_topic, encode(goodbye), qos=1, retain=True)

    async def flush(self, timeout: float) -> bool:
        """Wait until every outbox entry has been handed to the broker (or ``timeout``)."""
        self._all_sent.clear()
        self.wake()
        try:
            async with asyncio.timeout(timeout):
                await self._all_sent.wait()
        except TimeoutError:
            return False
        return True

    # ------------------------------------------------------------ connection

    def _client_for(self) -> aiomqtt.Client:
        cfg = self.config
        will = aiomqtt.Will(
            topic=self.state_topic,
            payload=encode(State(state="offline", reason="connection lost")),
            qos=1,
            retain=True,
        )
        client = aiomqtt.Client(
            cfg.broker.host,
            cfg.broker.port,
            # The shipped broker config replaces the client id with the username, which the
            # config requires to be the device id: the persistent session stays this one.
            identifier=cfg.device.id,
            username=cfg.broker.username,
            password=cfg.broker.password,
            clean_session=False,  # queued QoS 1 tasks survive a short disconnect
            keepalive=cfg.broker.keepalive_s,
            will=will,
            tls_context=self._tls,
            max_inflight_messages=100,
            timeout=max(10.0, cfg.broker.keepalive_s),
        )
        # The outbox publisher keeps up to PUBLISH_BATCH publishes in flight on purpose.
        client.pending_calls_threshold = 2 * PUBLISH_BATCH
        return client

    async def _session(self) -> None:
        async with self._client_for() as client:
            await client.subscribe(self.cmd_filter, qos=1)
            await client.publish(
                self.state_topic,
                encode(self._birth()),
                qos=1,
                retain=True,
                timeout=PUBLISH_TIMEOUT_S,
            )
            self._client = client
            self.connected.set()
            self._backoff.reset()
            self._counters.inc("link.connects")
            log.info("connected to %s:%d", self.config.broker.host, self.config.broker.port)
            self._on_connect()
            # Not a TaskGroup: on Python 3.11 one whose child fails leaves the parent's
            # cancel count raised for good (uncancel runs before the child's cancel), and
            # one cancelled while a child fails drops the CancelledError; run() needs both
            # to stay exact to tell a stop from a lost connection.
            children = [
                asyncio.create_task(self._drain_outbox(client), name="outbox-publisher"),
                asyncio.create_task(self._receive(client), name="receiver"),
            ]
            try:
                done, _ = await asyncio.wait(children, return_when=asyncio.FIRST_EXCEPTION)
                for child in done:
                    child.result()
            finally:
                await cancel_and_wait(children)

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload
            if not isinstance(payload, (bytes, bytearray)):
                payload = b"" if payload is None else str(payload).encode()
            topic = str(message.topic)
            channel = topic.rsplit("/", 1)[-1]
            # Handle concurrently (intake commits are group-committed), with a bound.
            await self._handler_slots.acquire()
            task = asyncio.create_task(self._handle(topic, channel, bytes(payload)))
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)

    async def _handle(self, topic: str, channel: str, payload: bytes) -> None:
        try:
            await self._on_message(topic, channel, payload)
        except Exception:  # a handler bug must never take the link down
            self._counters.inc("link.handler_errors")
            log.exception("error handling message on %s", topic)
        finally:
            self._handler_slots.release()

    async def _drain_outbox(self, client: aiomqtt.Client) -> None:
        await self._outbox.reset_sent()
        resend_after = self.config.outbox.resend_after_s
        while True:
            self._wake.clear()
            entries = await self._outbox.unsent(
                resend_before=time.time() - resend_after, limit=PUBLISH_BATCH
            )
            if not entries:
                self._all_sent.set()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(resend_after / 2):
                        await self._wake.wait()
                continue
            await asyncio.gather(
                *(
                    client.publish(e.topic, e.payload, qos=1, timeout=PUBLISH_TIMEOUT_S)
                    for e in entries
                )
            )
            await self._outbox.mark_sent([e.seq for e in entries], time.time())
            self._counters.inc("results.published", len(entries))
