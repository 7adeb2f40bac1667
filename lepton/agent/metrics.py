"""In-process counters and a rate-limited rejection log.

Counters travel in every capacity report (``CapacityReport.counters``), so the coordinator
sees each device's rejects, overflows and re-sends without a scrape endpoint on the device.
"""

from __future__ import annotations

import logging
import time
from collections import Counter


class Counters:
    """Monotonic named counters (``rejected.malformed``, ``results.published`` ...)."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._log_window: dict[str, tuple[float, int]] = {}

    def inc(self, name: str, n: int = 1) -> None:
        self._counts[name] += n

    def __getitem__(self, name: str) -> int:
        return self._counts[name]

    def snapshot(self) -> dict[str, int]:
        return dict(self._counts)

    def reject(
        self,
        logger: logging.Logger,
        reason: str,
        detail: str,
        *,
        topic: str = "",
        per_minute: int = 10,
    ) -> None:
        """Count a rejected input and log it, at most ``per_minute`` lines per reason."""
        self.inc(f"rejected.{reason}")
        now = time.monotonic()
        start, logged = self._log_window.get(reason, (now, 0))
        if now - start >= 60.0:
            start, logged = now, 0
        if logged < per_minute:
            logger.warning(
                "rejected input: reason=%s topic=%s detail=%s", reason, topic, detail[:300]
            )
        elif logged == per_minute:
            logger.warning("rejected input: reason=%s: further lines suppressed for 60 s", reason)
        self._log_window[reason] = (start, logged + 1)
