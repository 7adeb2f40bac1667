"""What the fleet CA accepts from outside: a device's CSR, server names, lifetimes, PEM.

Every refusal is a :class:`PkiError` with a stable ``reason`` and a detail written here
(bounded, quoting the input only in part), so enrolment can log it, count it under the
reason and answer it without echoing what a client sent.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Iterable
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from lepton.common.errors import LeptonError
from lepton.protocol.errors import TopicError
from lepton.protocol.topics import validate_id

_DNS_RE: Final = re.compile(
    r"(?=.{1,253}\Z)(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
    r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z"
)

#: Device keys accepted in a CSR: these curves, or RSA of at least ``MIN_RSA_BITS``.
CURVES: Final = ("secp256r1", "secp384r1")
MIN_RSA_BITS: Final = 2048


class PkiError(LeptonError):
    """A certificate was refused or cannot be made; ``reason`` is a stable token
    (``bad_csr``, ``bad_signature``, ``wrong_cn``, ``bad_key``, ``bad_lifetime``, ``bad_san``,
    ``bad_pem``)."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"pki: {reason}: {detail}")


def load_cert(cert_pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise PkiError("bad_pem", f"not a PEM certificate: {exc}") from exc


def ca_fingerprint(cert_pem: bytes) -> str:
    """``sha256:<hex>`` of the certificate's DER encoding (what a device pins)."""
    der = load_cert(cert_pem).public_bytes(serialization.Encoding.DER)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def parse_sans(names: Iterable[str]) -> list[x509.GeneralName]:
    """Host names become DNS names, addresses IP addresses; anything else is refused."""
    out: list[x509.GeneralName] = []
    for raw in names:
        name = raw.strip()
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name.strip("[]"))))
            continue
        except ValueError:
            pass
        if not _DNS_RE.match(name):
            raise PkiError("bad_san", f"{raw[:100]!r} is neither a host name nor an IP address")
        out.append(x509.DNSName(name.lower()))
    if not out:
        raise PkiError("bad_san", "a server certificate needs at least one name")
    return out


def check_days(days: int, cap: int) -> int:
    if not isinstance(days, int) or not 1 <= days <= cap:
        raise PkiError("bad_lifetime", f"lifetime must be 1..{cap} days, got {days!r}")
    return days


def check_device_csr(
    csr_pem: bytes, device_id: str
) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    """The public key of ``device_id``'s CSR, once the CSR parses, its signature verifies
    (the sender holds the key), its subject is exactly ``CN=device_id`` and its key is one
    of :data:`CURVES` or RSA >= :data:`MIN_RSA_BITS`; else :class:`PkiError`."""
    try:
        validate_id(device_id)
    except TopicError as exc:
        raise PkiError("wrong_cn", str(exc)) from exc
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise PkiError("bad_csr", f"not a PEM CSR: {exc}") from exc
    try:
        valid = csr.is_signature_valid
    except (ValueError, InvalidSignature) as exc:  # an unsupported or broken signature
        raise PkiError("bad_signature", f"the CSR's signature cannot be checked: {exc}") from exc
    if not valid:
        raise PkiError("bad_signature", "the CSR is not signed by the key it carries")
    attrs = list(csr.subject)
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(attrs) != 1 or len(cns) != 1 or cns[0].value != device_id:
        got = csr.subject.rfc4514_string()[:200]
        raise PkiError("wrong_cn", f"the CSR's subject must be exactly CN={device_id}, got {got!r}")
    public = csr.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        if public.curve.name not in CURVES:
            raise PkiError("bad_key", f"curve {public.curve.name} is not accepted")
        return public
    if isinstance(public, rsa.RSAPublicKey):
        if public.key_size < MIN_RSA_BITS:
            raise PkiError("bad_key", f"RSA key of {public.key_size} bits; at least {MIN_RSA_BITS}")
        return public
    raise PkiError("bad_key", f"{type(public).__name__} keys are not accepted")
