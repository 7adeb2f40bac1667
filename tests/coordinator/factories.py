"""Small builders for protocol messages and store inputs used across coordinator tests."""

from __future__ import annotations

import time
from typing import Any

from lepton.coordinator.store import CapacitySample, NewTask
from lepton.protocol.messages import Bench, CapacityReport, Cpu, Memory, Slots, new_id


def report(
    *,
    slots: int = 2,
    busy: int = 0,
    interval_s: float = 5.0,
    gflops: float = 10.0,
    ts: float | None = None,
    mem_available: int = 2 << 30,
    runtimes: tuple[str, ...] = ("onnxruntime",),
    device_class: str | None = "rpi5",
    **extra: Any,
) -> CapacityReport:
    return CapacityReport(
        ts=time.time() if ts is None else ts,
        device_class=device_class,
        device_model="Raspberry Pi 5",
        cpu=Cpu(count=4, percent=10.0),
        memory=Memory(total=4 << 30, available=mem_available),
        runtimes=list(runtimes),
        bench=Bench(fp32_gflops=gflops),
        slots=Slots(total=slots, busy=busy),
        interval_s=interval_s,
        **extra,
    )


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
