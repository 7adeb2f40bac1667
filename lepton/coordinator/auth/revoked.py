"""Which devices are revoked, in memory: the ingest asks it about every device message.

A snapshot (a ``frozenset`` swapped whole, so the MQTT network thread reads it without a
lock) loaded from ``auth_devices`` at start and every ``refresh_s`` after (revocations made
by other replicas arrive that way), and changed at once by this process's own revocations
and enrolments. A membership test per message, never a database query.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

REFRESH_S = 5.0


class RevokedDevices:
    """The set of revoked device ids (``device_id in revoked``)."""

    def __init__(self, load: Callable[[], frozenset[str]] | None = None) -> None:
        self._load = load
        self._ids: frozenset[str] = frozenset()
        self._lock = threading.Lock()  # writers only
        self._changes = 0  # local changes so far: a reload that overlapped one is not applied

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def bind(self, load: Callable[[], frozenset[str]]) -> None:
        """Where :meth:`refresh` reads the revoked ids from (the enrolment store)."""
        self._load = load

    def add(self, device_id: str) -> None:
        with self._lock:
            self._ids = self._ids | {device_id}
            self._changes += 1

    def discard(self, device_id: str) -> None:
        with self._lock:
            self._ids = self._ids - {device_id}
            self._changes += 1

    def refresh(self) -> bool:
        """Reload from the database (blocking); False when a local change came in while it
        read (the snapshot read may predate it: the next refresh applies)."""
        if self._load is None:
            return False
        before = self._changes
        ids = self._load()
        with self._lock:
            if self._changes != before:
                return False
            self._ids = ids
        return True

    async def keep_fresh(self, every_s: float = REFRESH_S) -> None:
        """Refresh every ``every_s`` seconds until cancelled (a failure is logged)."""
        while True:
            try:
                await asyncio.to_thread(self.refresh)
            except Exception:
                log.warning("revoked devices not refreshed from the database", exc_info=True)
            await asyncio.sleep(every_s)
