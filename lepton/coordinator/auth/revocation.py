"""Revoking a device (``POST /v1/devices/{id}/revoke``, ``lepton devices revoke``).

In one go, in this order: the identity is marked revoked (its HTTP token is refused from
the next request: the guard looks the token up on every request); this process stops
taking its MQTT messages (:class:`RevokedDevices`, read by the ingest and by the control
worker for what was already queued; other replicas within their refresh interval); it goes
offline with reason ``revoked`` and its assigned and running tasks go
back to pending without backoff (the scheduler is woken); then its broker account is
removed (with dynamic security the broker ends its session and refuses it from then on).
A broker that does not confirm the removal does not undo the rest: the answer says so,
and revoking again retries it. Every revocation is audited.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from lepton.coordinator.auth.broker_accounts import BrokerAccounts, BrokerAccountsError
from lepton.coordinator.auth.enrolment_store import EnrolmentStore
from lepton.coordinator.auth.revoked import RevokedDevices
from lepton.coordinator.auth.store import AuthStore
from lepton.coordinator.metrics import Metrics
from lepton.coordinator.store.devices import DeviceRepo

log = logging.getLogger(__name__)


class Revoker:
    """Revokes enrolled devices (see module doc)."""

    def __init__(  # noqa: PLR0917 - what revocation touches
        self,
        store: EnrolmentStore,
        audit: AuthStore,
        accounts: BrokerAccounts,
        devices: DeviceRepo,
        revoked: RevokedDevices,
        metrics: Metrics,
        *,
        on_requeue: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.audit = audit
        self.accounts = accounts
        self.devices = devices
        self.revoked = revoked
        self.metrics = metrics
        self.on_requeue = on_requeue

    async def revoke(
        self, device_id: str, *, actor: str, reason: str = "", remote: str = ""
    ) -> dict[str, Any]:
        """Revoke ``device_id`` (``NotFoundError`` if it was never enrolled); what was done."""
        identity = await asyncio.to_thread(self.store.revoke_device, device_id, actor)
        self.revoked.add(device_id)
        # Offline from after the ingest stopped taking its messages: a report received
        # before then (still in the capacity buffer) is older, and cannot revive it.
        now = time.time()
        requeued = await asyncio.to_thread(self.devices.mark_revoked, device_id, now)
        self.metrics.devices_offline.labels("revoked").inc()
        if requeued:
            self.metrics.task_transitions.labels("pending").inc(len(requeued))
            self.on_requeue()
        broker_error: str | None = None
        try:
            await self.accounts.remove(device_id)
        except BrokerAccountsError as exc:
            broker_error = exc.detail
            log.error("device %s revoked, but its broker account not removed: %s", device_id, exc)  # noqa: TRY400 - no traceback
        log.warning(
            "device %s revoked by %s (%s); %d tasks requeued",
            device_id,
            actor,
            reason or "no reason given",
            len(requeued),
        )
        out = {
            "device_id": device_id,
            "revoked_at": identity.revoked_at,
            "requeued": requeued,
            "broker_account_removed": broker_error is None,
            "broker_error": broker_error,
            "reason": reason or None,
        }
        await asyncio.to_thread(self._audit, actor, device_id, out, remote)
        return out

    def _audit(self, actor: str, device_id: str, out: dict[str, Any], remote: str) -> None:
        outcome = "ok" if out["broker_account_removed"] else "broker_error"
        try:
            self.audit.audit(actor, "revoke", device_id, outcome, remote=remote, detail=out)
        except Exception:
            log.warning("audit record of revoking %s not written", device_id, exc_info=True)
