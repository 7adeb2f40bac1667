"""The fleet's certificate authority: one CA that signs the broker's and the API's server
certificates and the devices' client certificates (what it accepts from outside is checked
in :mod:`lepton.coordinator.auth.checks`).

Everything is ECDSA P-256 and PEM. The CA is long-lived (``CA_DAYS``); leaf certificates are
bounded (``MAX_SERVER_DAYS``, ``MAX_DEVICE_DAYS``) and never outlive the CA. A device
certificate is issued only from a CSR whose signature verifies (the device holds the key)
and whose subject is exactly ``CN=<device id>``: the broker takes the CN as the username
(``use_identity_as_username``) and its ACLs grant topics to ``%u``, so the CN *is* the
device's identity. The device's requested extensions are ignored; the CA writes its own.

:func:`ca_fingerprint` is ``sha256:<hex>`` of the CA certificate's DER bytes: a device given
it out of band at enrolment pins the CA it is then sent (as kubeadm's discovery hash does).

Revocation: :meth:`FleetCA.crl` signs a CRL of the serials given (Mosquitto reads one with
``crlfile``); keeping the list of revoked serials is the caller's.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPublicKeyTypes,
    CertificatePublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lepton.coordinator.auth.checks import (
    PkiError,
    ca_fingerprint,
    check_days,
    check_device_csr,
    load_cert,
    parse_sans,
)
from lepton.protocol.topics import validate_id

# The checks of what comes from outside live in .checks; these names are part of this API.
__all__ = [
    "CA_DAYS",
    "MAX_DEVICE_DAYS",
    "MAX_SERVER_DAYS",
    "FleetCA",
    "Issued",
    "PkiError",
    "ca_fingerprint",
    "device_key_and_csr",
    "parse_sans",
]

CA_DAYS: Final = 3650
MAX_SERVER_DAYS: Final = 825
MAX_DEVICE_DAYS: Final = 397
#: Certificates start this far in the past, so a device whose clock lags a little accepts them.
BACKDATE: Final = dt.timedelta(minutes=5)


@dataclass(frozen=True, slots=True)
class Issued:
    """A certificate and its private key, both PEM."""

    cert_pem: bytes
    key_pem: bytes


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted: the file's mode (0600) protects it."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _spki(public: CertificatePublicKeyTypes) -> bytes:
    der: bytes = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def _key_usage(*, ca: bool, rsa_key: bool = False) -> x509.KeyUsage:
    """Signing for every key; certificates and CRLs for the CA; key transport for RSA."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=rsa_key,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


class FleetCA:
    """A loaded CA: signs server, client and device certificates and CRLs."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.cert = cert
        self.key = key

    @classmethod
    def create(cls, name: str = "Lepton fleet CA", *, days: int = CA_DAYS) -> FleetCA:
        """A new self-signed CA (path length 0: it signs leaves only)."""
        key = _new_key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def from_pem(cls, cert_pem: bytes, key_pem: bytes) -> FleetCA:
        cert = load_cert(cert_pem)
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as exc:
            raise PkiError("bad_pem", f"not an unencrypted PEM private key: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError("bad_key", "the CA key must be an EC key")
        if _spki(key.public_key()) != _spki(cert.public_key()):
            raise PkiError("bad_key", "the CA key does not belong to the CA certificate")
        return cls(cert, key)

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return key_pem(self.key)

    @property
    def fingerprint(self) -> str:
        return ca_fingerprint(self.cert_pem)

    # ------------------------------------------------------------------ leaves

    def issue_server(
        self, sans: Sequence[str], *, days: int = MAX_SERVER_DAYS, name: str | None = None
    ) -> Issued:
        """A new key and a server certificate for ``sans`` (host names and addresses); the
        CN is ``name`` or the first SAN (clients check the SANs, not the CN)."""
        names = parse_sans(sans)
        key = _new_key()
        cn = name or sans[0].strip()
        cert = self._leaf(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn[:64])]),
            key.public_key(),
            check_days(days, MAX_SERVER_DAYS),
            ExtendedKeyUsageOID.SERVER_AUTH,
            x509.SubjectAlternativeName(names),
        )
        return Issued(cert.public_bytes(serialization.Encoding.PEM), key_pem(key))

    def issue_client(self, identity: str, *, days: int = MAX_DEVICE_DAYS) -> Issued:
        """A new key and a client certificate with ``CN=identity`` (the coordinator's own
        identity at a broker that requires certificates)."""
        validate_id(identity, what="client identity")
        key = _new_key()
        cert = self._client_cert(identity, key.public_key(), days)
        return Issued(cert.public_bytes(serialization.Encoding.PEM), key_pem(key))

    def sign_device_csr(self, csr_pem: bytes, device_id: str, days: int = 365) -> bytes:
        """The PEM client certificate for ``device_id``'s CSR; :class:`PkiError` unless the
        CSR parses, its signature verifies, its subject is exactly ``CN=device_id``, its key
        is P-256/P-384 or RSA >= 2048, and ``days`` is 1..``MAX_DEVICE_DAYS``."""
        check_days(days, MAX_DEVICE_DAYS)
        public = check_device_csr(csr_pem, device_id)
        cert = self._client_cert(device_id, public, days)
        return cert.public_bytes(serialization.Encoding.PEM)

    def crl(self, revoked_serials: Iterable[int], *, days: int = 7) -> bytes:
        """A PEM CRL listing ``revoked_serials``, valid for ``days`` (re-sign before then)."""
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now - BACKDATE)
            .next_update(now + dt.timedelta(days=days))
        )
        for serial in sorted(set(revoked_serials)):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(now - BACKDATE)
                .build()
            )
        return builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    def _client_cert(
        self, identity: str, public: CertificateIssuerPublicKeyTypes, days: int
    ) -> x509.Certificate:
        return self._leaf(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity)]),
            public,
            check_days(days, MAX_DEVICE_DAYS),
            ExtendedKeyUsageOID.CLIENT_AUTH,
        )

    def _leaf(
        self,
        subject: x509.Name,
        public: CertificateIssuerPublicKeyTypes,
        days: int,
        usage: x509.ObjectIdentifier,
        sans: x509.SubjectAlternativeName | None = None,
    ) -> x509.Certificate:
        now = _now()
        # A leaf never outlives the CA that vouches for it.
        until = min(now + dt.timedelta(days=days), self.cert.not_valid_after_utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(until)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                _key_usage(ca=False, rsa_key=isinstance(public, rsa.RSAPublicKey)), critical=True
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if sans is not None:
            builder = builder.add_extension(sans, critical=False)
        return builder.sign(self.key, hashes.SHA256())


def device_key_and_csr(device_id: str) -> tuple[bytes, bytes]:
    """A new P-256 key and a CSR for ``CN=device_id``, both PEM (what a device sends to be
    enrolled; here for tools and tests)."""
    key = _new_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(key, hashes.SHA256())
    )
    return key_pem(key), csr.public_bytes(serialization.Encoding.PEM)
