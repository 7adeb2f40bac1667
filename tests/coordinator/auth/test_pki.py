"""The fleet CA: what it signs, what it refuses, and what it writes to disk."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lepton.coordinator.auth import cafiles
from lepton.coordinator.auth.pki import (
    MAX_DEVICE_DAYS,
    FleetCA,
    PkiError,
    ca_fingerprint,
    device_key_and_csr,
)


@pytest.fixture(scope="module")
def ca() -> FleetCA:
    return FleetCA.create("Unit CA")


def _csr(cn: str, key: ec.EllipticCurvePrivateKey | None = None, **extra: str) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    attrs += [x509.NameAttribute(NameOID.ORGANIZATION_NAME, v) for v in extra.values()]
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attrs))
    return csr.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_ca_is_a_ca_that_verifies_its_own_signature(ca: FleetCA) -> None:
    cert = ca.cert
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    cert.verify_directly_issued_by(cert)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc > dt.timedelta(days=3000)


def test_device_csr_gives_a_client_cert_whose_cn_is_the_device_id(ca: FleetCA) -> None:
    key, csr = device_key_and_csr("dev-7")
    cert = x509.load_pem_x509_certificate(ca.sign_device_csr(csr, "dev-7", 30))
    cert.verify_directly_issued_by(ca.cert)
    assert cert.subject.rfc4514_string() == "CN=dev-7"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=30) <= lifetime <= dt.timedelta(days=30, minutes=6)
    # The certificate carries the CSR's key, which the device kept.
    private = serialization.load_pem_private_key(key, None)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    assert cert.public_key().public_bytes(serialization.Encoding.DER, spki) == (
        private.public_key().public_bytes(serialization.Encoding.DER, spki)
    )


@pytest.mark.parametrize(
    ("csr_cn", "extra"),
    [("dev-8", {}), ("dev-7 ", {}), ("dev-7", {"o": "Evil"})],
    ids=["other-device", "near-miss", "extra-attribute"],
)
def test_csr_with_a_wrong_subject_is_refused(
    ca: FleetCA, csr_cn: str, extra: dict[str, str]
) -> None:
    with pytest.raises(PkiError) as err:
        ca.sign_device_csr(_csr(csr_cn, **extra), "dev-7", 30)
    assert err.value.reason == "wrong_cn"


def test_csr_with_a_forged_signature_is_refused(ca: FleetCA) -> None:
    """A CSR whose public key was swapped for another's (it claims a key it cannot use)."""
    csr = x509.load_pem_x509_csr(_csr("dev-7"))
    der = csr.public_bytes(serialization.Encoding.DER)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    old = csr.public_key().public_bytes(serialization.Encoding.DER, spki)
    theirs = ec.generate_private_key(ec.SECP256R1()).public_key()
    new = theirs.public_bytes(serialization.Encoding.DER, spki)
    assert len(old) == len(new)
    assert old in der
    forged = x509.load_der_x509_csr(der.replace(old, new))
    pem = forged.public_bytes(serialization.Encoding.PEM)
    with pytest.raises(PkiError) as err:
        ca.sign_device_csr(pem, "dev-7", 30)
    assert err.value.reason == "bad_signature"


def test_csr_garbage_bad_id_and_unbounded_lifetime_are_refused(ca: FleetCA) -> None:
    _, csr = device_key_and_csr("dev-7")
    cases = [
        (
            b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            "dev-7",
            30,
            "bad_csr",
        ),
        (csr, "dev-7", MAX_DEVICE_DAYS + 1, "bad_lifetime"),
        (csr, "dev-7", 0, "bad_lifetime"),
        (csr, "dev/7", 30, "wrong_cn"),
    ]
    for pem, device_id, days, reason in cases:
        with pytest.raises(PkiError) as err:
            ca.sign_device_csr(pem, device_id, days)
        assert err.value.reason == reason, (device_id, days)


def test_csr_with_a_weak_or_unaccepted_key_is_refused(ca: FleetCA) -> None:
    weak_rsa = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    p521 = ec.generate_private_key(ec.SECP521R1())
    for key in (weak_rsa, p521, ed25519.Ed25519PrivateKey.generate()):
        builder = x509.CertificateSigningRequestBuilder().subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-7")])
        )
        algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
        pem = builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)
        with pytest.raises(PkiError) as err:
            ca.sign_device_csr(pem, "dev-7", 30)
        assert err.value.reason == "bad_key", type(key)
    # RSA 2048 is fine.
    ok = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-7")])
    )
    pem = builder.sign(ok, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
    assert ca.sign_device_csr(pem, "dev-7", 30).startswith(b"-----BEGIN CERTIFICATE-----")


def test_server_cert_carries_dns_and_ip_sans(ca: FleetCA) -> None:
    issued = ca.issue_server(["broker.fleet.example", "10.0.0.5", "::1"])
    cert = x509.load_pem_x509_certificate(issued.cert_pem)
    cert.verify_directly_issued_by(ca.cert)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["broker.fleet.example"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("::1"),
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    for bad in (["not a host"], [], ["a/b"]):
        with pytest.raises(PkiError) as err:
            ca.issue_server(bad)
        assert err.value.reason == "bad_san"


def test_leaf_never_outlives_the_ca() -> None:
    short = FleetCA.create("Short CA", days=10)
    issued = short.issue_server(["localhost"], days=800)
    cert = x509.load_pem_x509_certificate(issued.cert_pem)
    assert cert.not_valid_after_utc <= short.cert.not_valid_after_utc


def test_fingerprint_is_the_sha256_of_the_der_and_stable(ca: FleetCA, tmp_path: Path) -> None:
    der = ca.cert.public_bytes(serialization.Encoding.DER)
    expected = "sha256:" + hashlib.sha256(der).hexdigest()
    assert ca_fingerprint(ca.cert_pem) == expected == ca.fingerprint
    # Stable across a round trip through disk and a PEM with other line endings.
    cafiles.save_ca(tmp_path, ca)
    assert cafiles.load_ca(tmp_path).fingerprint == expected
    assert ca_fingerprint(ca.cert_pem.replace(b"\n", b"\r\n")) == expected
    # Agrees with the standard library's reading of the PEM.
    assert ssl.PEM_cert_to_DER_cert(ca.cert_pem.decode()) == der
    assert FleetCA.create("Unit CA").fingerprint != expected


def test_files_keys_are_0600_and_a_ca_is_not_overwritten(ca: FleetCA, tmp_path: Path) -> None:
    old = os.umask(0)  # even with a permissive umask
    try:
        cafiles.save_ca(tmp_path, ca)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "ca.crt").stat().st_mode) == 0o644
    with pytest.raises(PkiError) as err:
        cafiles.save_ca(tmp_path, FleetCA.create("Other"))
    assert err.value.reason == "exists"
    assert cafiles.load_ca(tmp_path).fingerprint == ca.fingerprint
    other = FleetCA.create("Other")
    cafiles.save_ca(tmp_path, other, force=True)
    assert cafiles.load_ca(tmp_path).fingerprint == other.fingerprint


def test_a_key_that_does_not_match_the_certificate_is_refused(ca: FleetCA) -> None:
    other = FleetCA.create("Other")
    with pytest.raises(PkiError) as err:
        FleetCA.from_pem(ca.cert_pem, other.key_pem)
    assert err.value.reason == "bad_key"


def test_crl_lists_the_revoked_serials(ca: FleetCA) -> None:
    crl = x509.load_pem_x509_crl(ca.crl([5, 7, 5]))
    assert crl.is_signature_valid(ca.cert.public_key())  # type: ignore[arg-type]
    assert sorted(r.serial_number for r in crl) == [5, 7]
