"""Enrolling a simulated fleet: every virtual device exchanges one multi-use claim for its own
identity at start, as a real device would with ``lepton-agent enroll``.

A device whose state directory has an identity already keeps it (a restarted simulation does
not enrol again). The others enrol concurrently, at most ``concurrency`` at a time through one
HTTP connection pool, each retried with capped backoff on a connection error or a 502/503/504
(the coordinator answers 503 while it cannot make the broker account; the claim is not used
up then). Any other refusal (a spent claim, a taken id) stops the simulation with its reason.
Identity files are written without fsync: a simulated device need not survive a power cut.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lepton.agent import enrol, enrol_tls, identity
from lepton.protocol.enrolment import EnrollRequest

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Enrolment:
    """Where virtual devices enrol and with which claim (one with ``uses`` >= the fleet)."""

    url: str
    claim: str
    concurrency: int = 16
    retries: int = 5
    backoff: tuple[float, float] = (0.2, 5.0)
    insecure: bool = False  # plain http to a host other than this one
    ca_file: Path | None = None


@dataclass(frozen=True, slots=True)
class Device:
    device_id: str
    state_dir: Path
    device_class: str | None = None


async def enrol_fleet(enrolment: Enrolment, devices: list[Device]) -> int:
    """Enrol every device of ``devices`` without an identity; returns how many enrolled.
    Raises :class:`~lepton.agent.enrol.EnrolError` when one is refused for good."""
    import httpx

    enrol.check_url(enrolment.url, insecure=enrolment.insecure)
    todo = [d for d in devices if not identity.identity_path(d.state_dir).exists()]
    if not todo:
        return 0
    started = time.perf_counter()
    gate = asyncio.Semaphore(enrolment.concurrency)
    limits = httpx.Limits(max_connections=enrolment.concurrency)
    verify = await asyncio.to_thread(enrol_tls.verify_for, enrolment.url, enrolment.ca_file)
    async with httpx.AsyncClient(
        timeout=httpx.Timeout(30.0), limits=limits, follow_redirects=False, verify=verify
    ) as client:
        try:
            async with asyncio.TaskGroup() as tg:
                for device in todo:
                    tg.create_task(_enrol_one(client, gate, enrolment, device))
        except* enrol.EnrolError as group:  # the first refusal, as itself; the rest cancelled
            raise group.exceptions[0] from None
    log.info(
        "sim: enrolled %d devices in %.1f s (%d had an identity)",
        len(todo),
        time.perf_counter() - started,
        len(devices) - len(todo),
    )
    return len(todo)


async def _enrol_one(
    client: httpx.AsyncClient, gate: asyncio.Semaphore, enrolment: Enrolment, device: Device
) -> None:
    req = EnrollRequest(device_id=device.device_id, device_class=device.device_class)
    failures = 0
    while True:
        async with gate:
            try:
                resp = await enrol.request_identity(client, enrolment.url, enrolment.claim, req)
            except enrol.EnrolError as exc:
                if not _retryable(exc) or failures >= enrolment.retries:
                    raise
                failures += 1
            else:
                enrol.check_answer(resp, req)
                await asyncio.to_thread(
                    identity.write_identity, device.state_dir, resp, durable=False
                )
                return
        low, high = enrolment.backoff
        delay = random.uniform(low, min(high, low * 2 ** (failures - 1)))
        log.info(
            "sim: enrolment of %s failed; retry %d in %.2f s", device.device_id, failures, delay
        )
        await asyncio.sleep(delay)


def _retryable(exc: enrol.EnrolError) -> bool:
    return exc.reason == "connect_failed" or exc.status in enrol.RETRYABLE
