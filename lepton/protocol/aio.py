"""asyncio helpers shared by the agent and the coordinator."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any, Final

#: How long to wait for cancelled tasks before cancelling them again.
RECANCEL_S: Final = 1.0


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]], *, every: float = RECANCEL_S) -> None:
    """Cancel ``tasks`` and wait until all have ended, cancelling again those still running
    after ``every`` seconds.

    One cancel is not always enough on Python 3.11: ``asyncio.wait_for`` returns the result
    of a future that completed as the cancel arrived and drops the ``CancelledError`` (the
    MQTT client's publish waits that way), so a loop can go on to its next wait with the
    cancel spent, and a plain ``gather`` after one ``cancel()`` then waits for good. The
    tasks' errors are not raised here (they are marked retrieved, so asyncio does not log
    them at exit); read them from the tasks.
    """
    tasks = list(tasks)
    pending = {t for t in tasks if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        _done, pending = await asyncio.wait(pending, timeout=every)
    for task in tasks:
        if not task.cancelled():
            task.exception()
