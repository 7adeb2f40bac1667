"""Ingest: every message from a device is validated here, then routed.

Runs in the MQTT network thread. The topic names the sender (broker ACLs bind a device to
its own id); the channel names the only message type accepted on it. Capacity reports go to
the registry buffer (no event-loop wake-up per report); states, task acks and results go to
the :class:`Inbox`, drained by the control worker on the event loop. Anything that fails is
counted by reason in ``lepton_ingest_rejects_total`` and logged (throttled per reason); no
input can raise out of :meth:`Ingest.handle`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Container
from dataclasses import dataclass
from typing import Final

from lepton.coordinator.metrics import Metrics
from lepton.protocol import codec, topics
from lepton.protocol.errors import DecodeError, TopicError
from lepton.protocol.messages import CapacityReport, Message, Result, State, TaskAck

log = logging.getLogger(__name__)

CHANNEL_TYPES: Final[dict[str, type[Message]]] = {
    topics.STATE: State,
    topics.CAPACITY: CapacityReport,
    topics.TASK_ACK: TaskAck,
    topics.RESULT: Result,
}
# QoS per channel: capacity reports are sent at QoS 0 and are worthless when stale.
CHANNEL_QOS: Final = {topics.STATE: 1, topics.CAPACITY: 0, topics.TASK_ACK: 1, topics.RESULT: 1}
LOG_EVERY_S: Final = 10.0


def subscriptions(fleet: str, *, shared_group: str | None) -> list[tuple[str, int]]:
    """Subscription filters for a fleet's device channels.

    With ``shared_group`` the high-volume channels are split between replicas through
    ``$share/{group}/...``. ``state`` is always a plain subscription: every replica sees
    every birth and will, and retained states are delivered on subscribe (the broker sends
    no retained messages on shared subscriptions).
    """
    subs: list[tuple[str, int]] = []
    for channel, qos in CHANNEL_QOS.items():
        topic = topics.device_filter(fleet, channel)
        if shared_group and channel != topics.STATE:
            topic = f"$share/{shared_group}/{topic}"
        subs.append((topic, qos))
    return subs


@dataclass(frozen=True, slots=True)
class Inbound:
    """A validated control message and the device its topic names."""

    device_id: str
    message: State | TaskAck | Result
    received_at: float
    retained: bool = False


class Inbox:
    """Hands control messages from the network thread to the event loop, in order.

    One wake-up per burst, not per message. Bounded: past ``limit`` messages are refused
    (counted as ``overloaded``); agents re-send what was not acknowledged.
    """

    def __init__(self, limit: int = 100_000) -> None:
        self.limit = limit
        self._items: deque[Inbound] = deque()
        self._lock = threading.Lock()
        self._event = asyncio.Event()
        self._signalled = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def push(self, item: Inbound) -> bool:
        """Any thread. False when full."""
        with self._lock:
            if len(self._items) >= self.limit:
                return False
            self._items.append(item)
            wake = not self._signalled
            self._signalled = True
        if wake and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._event.set)
            except RuntimeError:  # loop closed: shutting down
                return False
        return True

    async def get_batch(self, max_items: int = 500) -> list[Inbound]:
        """Wait for at least one message; return up to ``max_items`` in arrival order."""
        while True:
            await self._event.wait()
            with self._lock:
                batch = [self._items.popleft() for _ in range(min(max_items, len(self._items)))]
                if not self._items:
                    self._event.clear()
                    self._signalled = False
            if batch:
                return batch

    def take_all(self) -> list[Inbound]:
        with self._lock:
            batch = list(self._items)
            self._items.clear()
            self._event.clear()
            self._signalled = False
        return batch

    def __len__(self) -> int:
        return len(self._items)


class _Throttle:
    """Log each reject reason at most once per ``LOG_EVERY_S``, with a count of the rest."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def __call__(self, reason: str, detail: str) -> None:
        now = time.monotonic()
        with self._lock:
            last, hidden = self._last.get(reason, (-LOG_EVERY_S, 0))
            if now - last < LOG_EVERY_S:
                self._last[reason] = (last, hidden + 1)
                return
            self._last[reason] = (now, 0)
        more = f" (+{hidden} more since last logged)" if hidden else ""
        log.warning("rejected device message: %s: %s%s", reason, detail, more)


class Ingest:
    """Validate and route device messages for one fleet (see module doc)."""

    def __init__(
        self,
        fleet: str,
        metrics: Metrics,
        *,
        on_capacity: Callable[[str, CapacityReport, float], None],
        inbox: Inbox,
        max_bytes: int = codec.MAX_MESSAGE_BYTES,
        revoked: Container[str] = frozenset(),
    ) -> None:
        self.fleet = fleet
        self.metrics = metrics
        self.on_capacity = on_capacity
        self.inbox = inbox
        self.max_bytes = max_bytes
        # Revoked devices (auth.revoked.RevokedDevices): one set lookup per message.
        self.revoked = revoked
        self.accepting = True
        self._log = _Throttle()
        # Labelled children looked up once: this is the hot path of the capacity stream.
        self._counted = {c: metrics.ingest_messages.labels(c) for c in CHANNEL_TYPES}

    def reject(self, reason: str, detail: str) -> None:
        self.metrics.reject(reason)
        self._log(reason, detail)

    def handle(self, topic: str, payload: bytes, retained: bool = False) -> None:
        """Validate one message and route it. Never raises."""
        try:
            self._handle(topic, payload, retained)
        except Exception:  # a bug, not bad input: count it and keep going
            self.metrics.reject("internal_error")
            log.exception("ingest failed on %s", topic)

    def _handle(self, topic: str, payload: bytes, retained: bool) -> None:  # noqa: PLR0911
        if not self.accepting:
            return  # draining: the agent re-sends anything not acknowledged
        received_at = time.time()
        try:
            parsed = topics.parse(topic)
        except TopicError as exc:
            self.reject("bad_topic", str(exc))
            return
        if parsed.fleet != self.fleet or parsed.direction != "device":
            self.reject("bad_topic", topic)
            return
        if parsed.device_id in self.revoked:
            # Still connected (a broker without per-device accounts, or before the kick):
            # nothing it says is applied.
            self.reject("revoked_device", topic)
            return
        expect = CHANNEL_TYPES.get(parsed.channel)
        if expect is None:
            self.reject("unhandled_channel", topic)
            return
        try:
            msg = codec.decode(payload, expect, max_bytes=self.max_bytes)
        except DecodeError as exc:
            self.reject(exc.reason, f"{topic}: {exc.detail}"[:300])
            return
        self._counted[parsed.channel].inc()
        self.metrics.ingest_bytes.inc(len(payload))
        if isinstance(msg, CapacityReport):
            self.on_capacity(parsed.device_id, msg, received_at)
            return
        assert isinstance(msg, (State, TaskAck, Result))
        if not self.inbox.push(Inbound(parsed.device_id, msg, received_at, retained)):
            self.reject("overloaded", f"{topic}: control inbox full")
