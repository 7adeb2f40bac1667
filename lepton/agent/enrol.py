"""Enrolment, the device's side: exchange a one-time claim for this device's own identity.

``POST <coordinator>/v1/enroll`` with the claim as ``Authorization: Bearer lpc_...`` and an
:class:`~lepton.protocol.enrolment.EnrollRequest`; the answer's identity is written into the
state directory by :func:`lepton.agent.identity.write_identity`.

Trust, decided before the claim leaves the device (a claim sent to an impostor is spent):

- ``https``: the TLS connection verifies the server against ``ca_file`` when given, else the
  pinned CA when the server presents it in its chain, else the system's trust store
  (:mod:`lepton.agent.enrol_tls`); a certificate none of them trusts is refused with what
  to pass instead. With a pin (``sha256:<hex>`` of the fleet CA certificate's DER), the CA
  in the answer must match it before anything is used or written: the pin is what makes the
  fleet CA (which the broker is then verified with) trustworthy.
- ``http``: to a loopback address only, unless ``insecure`` (the claim and the returned
  credentials then cross the network in clear text, and the caller warns loudly).

A refusal is an :class:`EnrolError` carrying the coordinator's ``reason`` and ``detail``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import ssl
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit

import msgspec

from lepton.agent.fetch import tls_refused
from lepton.common.errors import LeptonError
from lepton.protocol.enrolment import (
    ENROLLED_STATUS,
    EnrollRequest,
    EnrollResponse,
    decode_response,
)
from lepton.protocol.errors import TopicError
from lepton.protocol.routes import ENROLL
from lepton.protocol.topics import validate_id

if TYPE_CHECKING:
    import httpx

_PIN_RE: Final = re.compile(r"(?:sha256:)?([0-9a-fA-F]{64})")
_SECRET_RE: Final = re.compile(r"[\x21-\x7e]{1,512}")
#: Statuses worth another try (the claim is not used up by them).
RETRYABLE: Final = frozenset({502, 503, 504})


class EnrolError(LeptonError):
    """Enrolment failed: ``reason`` is the coordinator's token (``claim_used``...) or one of
    ours (``bad_url``, ``insecure_http``, ``untrusted_ca``, ``ca_pin_mismatch``,
    ``no_ca``, ``connect_failed``, ``bad_response``, ``http_<status>``, ``no_cryptography``)."""

    def __init__(self, reason: str, detail: str, *, status: int | None = None) -> None:
        self.reason = reason
        self.detail = detail
        self.status = status
        super().__init__(f"{reason}: {detail}")


@dataclass(frozen=True, slots=True)
class Csr:
    """A locally generated P-256 key (never sent) and its signing request."""

    key_pem: bytes = field(repr=False)
    csr_pem: str


def enroll_url(url: str) -> str:
    """The enrolment endpoint of a coordinator given by its base URL (or the endpoint)."""
    base = url.rstrip("/")
    return base if base.endswith(ENROLL) else base + ENROLL


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_url(url: str, *, insecure: bool = False) -> str:
    """The URL's scheme once it is acceptable: https, or http to loopback (or ``insecure``)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise EnrolError("bad_url", f"{url[:200]!r} is not an http(s) URL with a host")
    if scheme == "http" and not insecure and not is_loopback(parts.hostname):
        raise EnrolError(
            "insecure_http",
            f"{url[:200]} is plain http to a host that is not this machine: the claim and the "
            "credentials it buys would cross the network unencrypted. Use the coordinator's "
            "https URL (with --ca-sha256 or --ca-file), or pass --insecure on a network you trust",
        )
    return scheme


def parse_pin(pin: str) -> str:
    """``sha256:<64 hex>`` (or the bare hex) -> the lower-case hex."""
    m = _PIN_RE.fullmatch(pin.strip())
    if m is None:
        raise ValueError(f"--ca-sha256 must be sha256:<64 hex digits>, got {pin[:80]!r}")
    return m.group(1).lower()


def ca_fingerprint(ca_pem: str) -> str:
    """The SHA-256 (hex) of the first certificate's DER in ``ca_pem``."""
    try:
        der = ssl.PEM_cert_to_DER_cert(ca_pem.strip())
    except ValueError as exc:
        raise EnrolError("bad_response", "the CA certificate in the answer is not PEM") from exc
    return hashlib.sha256(der).hexdigest()


def check_pin(resp: EnrollResponse, pin: str | None) -> None:
    """With a pin, the answer's fleet CA must be the pinned one (raises otherwise)."""
    if pin is None:
        return
    if not resp.ca_pem:
        raise EnrolError(
            "no_ca", "--ca-sha256 was given but the coordinator sent no fleet CA certificate"
        )
    got = ca_fingerprint(resp.ca_pem)
    if got != pin:
        raise EnrolError(
            "ca_pin_mismatch",
            f"the fleet CA the coordinator sent has sha256:{got}, not the pinned sha256:{pin}; "
            "nothing was written. Check the pin (lepton devices enroll prints it) or whether "
            "something between this device and the coordinator answers in its place",
        )


def check_answer(resp: EnrollResponse, req: EnrollRequest) -> None:
    """The answer is one the agent can run with: its ids are topic-safe, the MQTT username is
    the device id (the broker's ACL grants a device's topics to its username), the token
    and password are header- and file-safe, the coordinator URL is http(s)."""
    problems = []
    for what, value in (("device id", resp.device_id), ("fleet", resp.fleet)):
        try:
            validate_id(value, what=what)
        except TopicError as exc:
            problems.append(str(exc))
    if resp.device_id != req.device_id:
        problems.append(f"device id {resp.device_id!r} is not the one asked for")
    if resp.mqtt.username != resp.device_id:
        problems.append("the MQTT username is not the device id")
    for what, secret in (("http_token", resp.http_token), ("mqtt password", resp.mqtt.password)):
        if not _SECRET_RE.fullmatch(secret):
            problems.append(f"{what} is not 1-512 printable characters without spaces")
    if not 0 < resp.mqtt.port < 65536:
        problems.append(f"MQTT port {resp.mqtt.port} is out of range")
    if urlsplit(resp.coordinator_url).scheme.lower() not in ("http", "https"):
        problems.append("coordinator_url is not an http(s) URL")
    if problems:
        raise EnrolError("bad_response", "; ".join(problems) + "; nothing was written")


def check_certificate(resp: EnrollResponse, csr: Csr | None) -> None:
    """A CSR sent must come back signed: a key without its certificate is of no use."""
    if csr is not None and not resp.cert_pem:
        raise EnrolError("no_certificate", "a CSR was sent but no client certificate came back")


def make_csr(device_id: str) -> Csr:
    """A new P-256 key and a CSR whose subject CN is ``device_id`` (needs ``cryptography``)."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError as exc:
        raise EnrolError(
            "no_cryptography",
            "--csr needs the Python package 'cryptography' (pip install cryptography, or "
            "apt install python3-cryptography); enrol without --csr to use a password only",
        ) from exc
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return Csr(key_pem=key_pem, csr_pem=csr.public_bytes(serialization.Encoding.PEM).decode())


def _refusal(resp: httpx.Response) -> EnrolError:
    """The coordinator's ``{"detail", "reason"}`` (bounded, printable), or the bare status."""
    reason, detail = f"http_{resp.status_code}", f"HTTP {resp.status_code}"
    try:
        body = msgspec.json.decode(resp.content[:4096])
    except msgspec.DecodeError:
        body = None
    if isinstance(body, dict):
        if isinstance(body.get("reason"), str) and re.fullmatch(r"[a-z0-9_]{1,64}", body["reason"]):
            reason = body["reason"]
        if isinstance(body.get("detail"), str):
            detail = "".join(c for c in body["detail"][:500] if c.isprintable())
    return EnrolError(reason, detail, status=resp.status_code)


async def request_identity(
    client: httpx.AsyncClient, url: str, claim: str, req: EnrollRequest
) -> EnrollResponse:
    """One ``POST /v1/enroll``; the decoded answer or an :class:`EnrolError`."""
    import httpx

    target = enroll_url(url)
    try:
        resp = await client.post(
            target,
            content=msgspec.json.encode(req),
            headers={"Authorization": f"Bearer {claim}", "Content-Type": "application/json"},
        )
    except httpx.TransportError as exc:
        if tls_refused(exc):
            raise EnrolError(
                "untrusted_ca",
                f"{target}: the server's certificate is not trusted by this system. Pass "
                "--ca-file with the fleet CA certificate (copied from the coordinator "
                "host), or use a coordinator URL with a publicly trusted certificate "
                "together with --ca-sha256",
            ) from exc
        raise EnrolError("connect_failed", f"{target}: {type(exc).__name__}: {exc}") from exc
    if resp.status_code != ENROLLED_STATUS:
        raise _refusal(resp)
    try:
        return decode_response(resp.content)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise EnrolError("bad_response", f"{target}: not an enrolment answer: {exc}") from exc
