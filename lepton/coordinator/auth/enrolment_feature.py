"""Enrolment and revocation as a coordinator feature: the claim, enrol and revoke routes,
the check at start that the broker can make device accounts, and the in-memory set of
revoked devices the ingest consults (kept fresh from the database on every replica).

The fleet CA (``[auth] ca_file``, ``ca_key_file``: what ``lepton ca init`` writes) is read
at start: devices get its certificate, operators its fingerprint with each claim (the
device pins it), and with its key devices' CSRs are signed
(:meth:`lepton.coordinator.auth.pki.FleetCA.sign_device_csr`, ``cert_days``). Without a
key, an enrolment that sends a CSR is refused with 422 ``no_ca``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from fastapi import APIRouter

from lepton.coordinator.auth.broker_accounts import BrokerAccounts, BrokerAccountsError
from lepton.coordinator.auth.enrolment import DeviceEndpoints, EnrolmentService, SignCsr
from lepton.coordinator.auth.enrolment_store import EnrolmentStore
from lepton.coordinator.auth.feature import AuthFeature
from lepton.coordinator.auth.pki import FleetCA, PkiError, ca_fingerprint
from lepton.coordinator.auth.revocation import Revoker
from lepton.coordinator.auth.revoked import RevokedDevices
from lepton.coordinator.auth.routes_enrol import make_router
from lepton.coordinator.config import Config
from lepton.coordinator.feature import BaseFeature
from lepton.coordinator.metrics import Metrics
from lepton.coordinator.store.devices import DeviceRepo

log = logging.getLogger(__name__)

CONNECT_WAIT_S = 60.0


class EnrolmentFeature(BaseFeature):
    """Claims, enrolment and revocation (see module doc)."""

    name = "enrolment"

    def __init__(  # noqa: PLR0917 - what enrolment is wired to
        self,
        config: Config,
        auth: AuthFeature,
        devices: DeviceRepo,
        metrics: Metrics,
        accounts: BrokerAccounts,
        revoked: RevokedDevices,
        *,
        base_url: Callable[[], str],
        wait_connected: Callable[[float], Awaitable[bool]],
        on_requeue: Callable[[], None] = lambda: None,
    ) -> None:
        self.config = config
        self.accounts = accounts
        self.revoked = revoked
        self.store = EnrolmentStore(auth.store.engine)
        revoked.bind(self.store.revoked_ids)
        self._wait_connected = wait_connected
        a, m = config.auth, config.mqtt
        ca_pem = Path(a.ca_file).expanduser().read_text() if a.ca_file else None
        self.ca_sha256 = ca_fingerprint(ca_pem.encode()) if ca_pem else None
        endpoints = DeviceEndpoints(
            fleet=config.fleet,
            mqtt_host=a.device_mqtt_host or m.host,
            mqtt_port=a.device_mqtt_port if a.device_mqtt_port is not None else m.port,
            mqtt_tls=a.device_mqtt_tls if a.device_mqtt_tls is not None else m.tls,
            coordinator_url=base_url,
            ca_pem=ca_pem,
        )
        self.service = EnrolmentService(
            self.store,
            auth.store,
            auth.metrics,
            accounts,
            endpoints,
            revoked=revoked,
            sign_csr=_signer(config, ca_pem),
        )
        self.revoker = Revoker(
            self.store, auth.store, accounts, devices, revoked, metrics, on_requeue=on_requeue
        )
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.revoked.refresh()
        self._tasks = [
            loop.create_task(self.revoked.keep_fresh(), name="revoked-devices"),
            loop.create_task(self._check_broker(), name="broker-accounts-check"),
        ]

    def routers(self) -> Sequence[APIRouter]:
        return [make_router(self.store, self.service, self.revoker, ca_sha256=self.ca_sha256)]

    async def drain(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _check_broker(self) -> None:
        """Say once, at start, when device accounts cannot be made (the service runs on)."""
        if self.config.mqtt.accounts == "none":
            return
        if not await self._wait_connected(CONNECT_WAIT_S):
            log.warning("broker accounts not checked: no broker connection yet")
            return
        try:
            await self.accounts.ensure_ready()
        except BrokerAccountsError as exc:
            log.error(  # noqa: TRY400 - no traceback
                'mqtt.accounts = "dynsec", but the broker cannot make device accounts (%s).'
                " Enrolments are refused (503 broker_unavailable) until it can: run the broker"
                " with the configuration `lepton broker init` writes (Mosquitto's dynamic"
                " security plugin, and an admin account for this coordinator in mqtt.username"
                ' / mqtt.password_file), or set mqtt.accounts = "none" if the broker\'s'
                " accounts are managed elsewhere.",
                exc.detail,
            )
        else:
            log.info("broker accounts: the dynamic security plugin answers")


def _signer(config: Config, ca_pem: str | None) -> SignCsr | None:
    """Signs device CSRs with the fleet CA, when its key is configured (a key that does not
    match the certificate stops the start: ``PkiError``)."""
    a = config.auth
    if not (a.ca_key_file and ca_pem):
        return None
    ca = FleetCA.from_pem(ca_pem.encode(), Path(a.ca_key_file).expanduser().read_bytes())

    def sign_csr(csr_pem: str, device_id: str) -> str:
        try:
            return ca.sign_device_csr(csr_pem.encode(), device_id, a.cert_days).decode()
        except PkiError as exc:  # the enrolment answers 422 bad_csr
            raise ValueError(f"{exc.reason}: {exc}") from exc

    return sign_csr
