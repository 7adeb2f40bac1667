"""Small builders for protocol messages and store inputs used across coordinator tests."""

from __future__ import annotations

import time
from typing import Any

from lepton.coordinator.store import CapacitySample, NewTask
from lepton.protocol.messages import new_id
from tests.support.device import report


def sample(device_id: str, *, received_at: float | None = None, **kw: Any) -> CapacitySample:
    now = time.time() if received_at is None else received_at
    kw.setdefault("ts", now)
    return CapacitySample.from_report(device_id, "default", report(**kw), now)


def new_task(
    task_id: str | None = None,
    *,
    now: float | None = None,
    expires_in: float = 3600.0,
    max_attempts: int = 3,
    **kw: Any,
) -> NewTask:
    now = time.time() if now is None else now
    kw.setdefault("kind", "echo")
    kw.setdefault("params", {"payload": "hi"})
    return NewTask(
        id=task_id or new_id(),
        fleet="default",
        expires_at=now + expires_in,
        created_at=now,
        max_attempts=max_attempts,
        **kw,
    )
