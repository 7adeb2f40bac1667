"""Enrolment: a device exchanges a claim for its own identity (``POST /v1/enroll``, the
contract in :mod:`lepton.protocol.enrolment`).

Checks, cheapest first; each refusal is counted (``lepton_auth_refusals_total{reason}``),
logged and audited (actor ``claim:<name>`` once the claim is known, else ``anonymous``):
the claim (401), the body (413, 422), the claim's class binding (403), a CSR without a
signer (422 ``no_ca``), an id held by a live identity (409). Then, in this order: the
broker account is provisioned with a fresh random password (failure: 503
``broker_unavailable``, the claim stays unused), and one transaction uses the claim and
writes the identity (:meth:`EnrolmentStore.redeem`); if that fails (a concurrent enrolment
took the last use) the broker account is removed again. Enrolments of one device id are
serialised in this process, so two of them never overwrite each other's broker password.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import msgspec

from lepton.common.errors import LeptonError
from lepton.coordinator.api.jsonbody import check_json
from lepton.coordinator.auth import credentials
from lepton.coordinator.auth.broker_accounts import BrokerAccounts, BrokerAccountsError
from lepton.coordinator.auth.enrolment_store import (
    ClaimRecord,
    EnrolmentRefusedError,
    EnrolmentStore,
)
from lepton.coordinator.auth.metrics import AuthMetrics
from lepton.coordinator.auth.revoked import RevokedDevices
from lepton.coordinator.auth.store import AuthStore
from lepton.protocol.enrolment import MAX_PEM_CHARS, EnrollRequest, EnrollResponse, MqttAccount

log = logging.getLogger(__name__)

#: The largest enrolment body: a CSR at its cap and the other fields.
MAX_BODY_BYTES: Final = MAX_PEM_CHARS + 4096
STATUS: Final = {
    "missing_claim": 401,
    "unknown_claim": 401,
    "claim_used": 401,
    "claim_expired": 401,
    "claim_revoked": 401,
    "class_mismatch": 403,
    "already_enrolled": 409,
    "oversized": 413,
    "malformed_request": 422,
    "no_ca": 422,
    "bad_csr": 422,
    "broker_unavailable": 503,
}
#: ``sign_csr(csr_pem, device_id) -> cert_pem`` (``ValueError`` for a CSR it refuses).
SignCsr = Callable[[str, str], str]


class EnrolRefusedError(LeptonError):
    """An enrolment refused: HTTP ``status``, a contract ``reason`` and a sentence."""

    def __init__(self, reason: str, detail: str, status: int | None = None) -> None:
        self.reason = reason
        self.status = status if status is not None else STATUS[reason]
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


@dataclass(frozen=True, slots=True)
class DeviceEndpoints:
    """What an enrolled device is told: where the broker is, the API, the fleet CA."""

    fleet: str
    mqtt_host: str
    mqtt_port: int
    mqtt_tls: bool
    coordinator_url: Callable[[], str]
    ca_pem: str | None = None


class EnrolmentService:
    """Turns a claim and an :class:`EnrollRequest` into an identity (see module doc)."""

    def __init__(
        self,
        store: EnrolmentStore,
        audit: AuthStore,
        metrics: AuthMetrics,
        accounts: BrokerAccounts,
        endpoints: DeviceEndpoints,
        *,
        revoked: RevokedDevices,
        sign_csr: SignCsr | None = None,
    ) -> None:
        self.store = store
        self.audit = audit
        self.metrics = metrics
        self.accounts = accounts
        self.endpoints = endpoints
        self.revoked = revoked
        self.sign_csr = sign_csr
        self._locks: dict[str, asyncio.Lock] = {}

    async def enroll(self, claim_token: str | None, body: bytes, remote: str) -> EnrollResponse:
        """The new identity, or :class:`EnrolRefusedError` (counted, logged, audited)."""
        actor = "anonymous"
        target = "?"
        try:
            claim = await self._claim(claim_token)
            actor = f"claim:{claim.name}"
            _check_usable(claim)
            req = _request(body)
            target = req.device_id
            out = await self._enroll(claim, claim_token or "", req)
        except EnrolRefusedError as exc:
            await self.refused(exc, remote, actor=actor, target=target)
            raise
        self.metrics.enrolments.inc()
        log.info("device %s enrolled with %s from %s", out.device_id, actor, remote)
        await asyncio.to_thread(self._audit, actor, out.device_id, "ok", remote)
        return out

    async def refused(
        self, exc: EnrolRefusedError, remote: str, *, actor: str = "anonymous", target: str = "?"
    ) -> None:
        """Count, log and audit a refusal (the route calls it for a body it would not read)."""
        self.metrics.refusals.labels(exc.reason).inc()
        log.info("enrolment of %s by %s from %s refused: %s", target, actor, remote, exc)
        await asyncio.to_thread(self._audit, actor, target, f"{exc.status} {exc.reason}", remote)

    async def _claim(self, token: str | None) -> ClaimRecord:
        if not token:
            raise EnrolRefusedError("missing_claim", "send the claim as Authorization: Bearer")
        if credentials.kind_of(token) != "claim":
            raise EnrolRefusedError("unknown_claim", "not an enrolment claim (lpc_...)")
        claim = await asyncio.to_thread(self.store.claim, credentials.digest(token))
        if claim is None:
            raise EnrolRefusedError("unknown_claim", "no such claim")
        return claim

    async def _enroll(self, claim: ClaimRecord, token: str, req: EnrollRequest) -> EnrollResponse:
        device_class = req.device_class or claim.device_class
        if claim.device_class is not None and device_class != claim.device_class:
            raise EnrolRefusedError(
                "class_mismatch", f"claim {claim.name} is for class {claim.device_class!r}"
            )
        cert_pem = self._certificate(req)
        # One lock per id ever enrolled here: bounded by the fleet, and never dropped while
        # a waiter may still take it.
        async with self._locks.setdefault(req.device_id, asyncio.Lock()):
            return await self._admit(claim, token, req, device_class, cert_pem)

    def _certificate(self, req: EnrollRequest) -> str | None:
        if req.csr_pem is None:
            return None
        if self.sign_csr is None:
            raise EnrolRefusedError("no_ca", "this coordinator signs no certificates (no CA key)")
        try:
            return self.sign_csr(req.csr_pem, req.device_id)
        except ValueError as exc:
            raise EnrolRefusedError("bad_csr", str(exc)[:300]) from None

    async def _admit(
        self,
        claim: ClaimRecord,
        token: str,
        req: EnrollRequest,
        device_class: str | None,
        cert_pem: str | None,
    ) -> EnrollResponse:
        device_id = req.device_id
        held = await asyncio.to_thread(self.store.identity, device_id)
        if held is not None and held.revoked_at is None:
            raise EnrolRefusedError("already_enrolled", f"{device_id} is enrolled; revoke it first")
        password = secrets.token_urlsafe(32)
        try:
            await self.accounts.provision(device_id, password)
        except BrokerAccountsError as exc:
            log.error("enrolment of %s: broker account not made: %s", device_id, exc.detail)  # noqa: TRY400 - no traceback
            raise EnrolRefusedError(
                "broker_unavailable", "the broker account could not be made; try again later"
            ) from None
        http_token = credentials.new("device")
        try:
            await asyncio.to_thread(
                self.store.redeem,
                credentials.digest(token),
                device_id,
                credentials.digest(http_token),
                device_class=device_class,
                device_group=claim.device_group,
                cert_serial=_serial(cert_pem),
            )
        except EnrolmentRefusedError as exc:
            await self._unprovision(device_id)
            raise EnrolRefusedError(exc.reason, f"claim {claim.name}: {exc.reason}") from None
        except BaseException:
            await self._unprovision(device_id)
            raise
        self.revoked.discard(device_id)
        e = self.endpoints
        return EnrollResponse(
            device_id=device_id,
            fleet=e.fleet,
            http_token=http_token,
            coordinator_url=e.coordinator_url(),
            mqtt=MqttAccount(
                host=e.mqtt_host,
                port=e.mqtt_port,
                tls=e.mqtt_tls,
                username=device_id,
                password=password,
            ),
            ca_pem=e.ca_pem,
            cert_pem=cert_pem,
            device_group=claim.device_group,
        )

    async def _unprovision(self, device_id: str) -> None:
        try:
            await self.accounts.remove(device_id)
        except BrokerAccountsError as exc:
            log.error(  # noqa: TRY400 - no traceback
                "broker account of %s made for an enrolment that failed, and not removed: %s",
                device_id,
                exc.detail,
            )

    def _audit(self, actor: str, target: str, outcome: str, remote: str) -> None:
        try:
            self.audit.audit(actor, "enroll", target, outcome, remote=remote)
        except Exception:  # the audit failing must not change the answer
            log.warning("audit record of an enrolment not written", exc_info=True)


def _check_usable(claim: ClaimRecord) -> None:
    why = claim.refusal(time.time())
    if why is not None:
        raise EnrolRefusedError(why, f"claim {claim.name}: {why.replace('_', ' ')}")


def _request(body: bytes) -> EnrollRequest:
    if len(body) > MAX_BODY_BYTES:
        raise EnrolRefusedError("oversized", f"the body is over {MAX_BODY_BYTES} bytes")
    problem = check_json(body)
    if problem is not None:
        raise EnrolRefusedError(problem.reason, problem.detail, problem.status)
    try:
        return msgspec.json.decode(body, type=EnrollRequest)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise EnrolRefusedError("malformed_request", str(exc)[:300]) from None


def _serial(cert_pem: str | None) -> str | None:
    if cert_pem is None:
        return None
    from cryptography import x509

    return format(x509.load_pem_x509_certificate(cert_pem.encode()).serial_number, "x")[:64]
