"""A test double of the coordinator's enrolment endpoint, to the contract in
:mod:`lepton.protocol.enrolment`: plug it into :class:`tests.support.httpserver.HttpServer`
(``server.post_handler = FakeEnrolment(...)``).

It keeps claims (one-time or with ``uses``, optionally bound to a device class), refuses as the
contract says (401 ``missing_claim``/``unknown_claim``/``claim_used``, 403 ``class_mismatch``,
409 ``already_enrolled``, 422 for a bad body or CSR), can be told to answer 503
``broker_unavailable`` a number of times first (the claim is not used then), issues an
``lpd_`` token and an MQTT password per device, sends its own CA (a real P-256 CA made with
``cryptography``) and signs a CSR whose CN is the device id.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import secrets
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from lepton.protocol.enrolment import ENROLLED_STATUS, EnrollRequest, EnrollResponse, MqttAccount
from lepton.protocol.routes import ENROLL

if TYPE_CHECKING:
    from tests.support.httpserver import HttpServer


def _ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test fleet CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


@dataclass
class Claim:
    uses: int
    device_class: str | None = None


@dataclass
class FakeEnrolment:
    coordinator_url: str
    broker_port: int = 1883
    broker_host: str = "127.0.0.1"
    fleet: str = "default"
    device_group: str | None = None
    send_ca: bool = True
    claims: dict[str, Claim] = field(default_factory=dict)
    enrolled: dict[str, EnrollResponse] = field(default_factory=dict)
    unavailable: int = 0  # answer this many requests 503 broker_unavailable first
    calls: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.ca_key, self.ca_cert = _ca()
        self.ca_pem = self.ca_cert.public_bytes(serialization.Encoding.PEM).decode()

    @property
    def ca_pin(self) -> str:
        der = self.ca_cert.public_bytes(serialization.Encoding.DER)
        return f"sha256:{hashlib.sha256(der).hexdigest()}"

    def serve_tls(
        self, server: HttpServer, workdir: Path, host: str = "127.0.0.1", *, chain: bool = False
    ) -> str:
        """Make ``server`` (not started yet) answer HTTPS with a certificate for ``host``
        signed by this fleet CA (``chain``: presented with the CA after it); returns its
        https base URL."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(self.ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]),
                critical=False,
            )
            .sign(self.ca_key, hashes.SHA256())
        )
        pem = cert.public_bytes(serialization.Encoding.PEM)
        (workdir / "server.crt").write_bytes(pem + (self.ca_pem.encode() if chain else b""))
        (workdir / "server.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        (workdir / "fleet-ca.pem").write_text(self.ca_pem)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(workdir / "server.crt", workdir / "server.key")
        listener = server._server
        listener.socket = ctx.wrap_socket(listener.socket, server_side=True)
        return f"https://{host}:{server.port}"

    def claim(self, uses: int = 1, device_class: str | None = None) -> str:
        token = f"lpc_{secrets.token_urlsafe(24)}"
        self.claims[token] = Claim(uses, device_class)
        return token

    def __call__(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        with self.lock:
            self.calls += 1
            if path != ENROLL:
                return _refuse(404, "not_found", "no such route")
            return self._enrol(headers, body)

    def _enrol(self, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        auth = next((v for k, v in headers.items() if k.lower() == "authorization"), "")
        if not auth.startswith("Bearer "):
            return _refuse(401, "missing_claim", "a claim is required")
        claim = self.claims.get(auth[7:])
        if claim is None:
            return _refuse(401, "unknown_claim", "no such claim")
        if claim.uses <= 0:
            return _refuse(401, "claim_used", "this claim has been used")
        try:
            req = msgspec.json.decode(body, type=EnrollRequest)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            return _refuse(422, "bad_request", str(exc))
        if claim.device_class is not None and req.device_class != claim.device_class:
            return _refuse(403, "class_mismatch", f"the claim is for {claim.device_class}")
        if req.device_id in self.enrolled:
            return _refuse(409, "already_enrolled", f"{req.device_id} is enrolled")
        cert_pem = None
        if req.csr_pem is not None:
            cert_pem = self._sign(req)
            if cert_pem is None:
                return _refuse(422, "bad_csr", "the CSR's CN must be the device id")
        if self.unavailable > 0:
            self.unavailable -= 1
            return _refuse(503, "broker_unavailable", "the broker account could not be made")
        claim.uses -= 1
        resp = EnrollResponse(
            device_id=req.device_id,
            fleet=self.fleet,
            http_token=f"lpd_{secrets.token_urlsafe(24)}",
            coordinator_url=self.coordinator_url,
            mqtt=MqttAccount(
                host=self.broker_host,
                port=self.broker_port,
                tls=False,
                username=req.device_id,
                password=secrets.token_urlsafe(16),
            ),
            ca_pem=self.ca_pem if self.send_ca else None,
            cert_pem=cert_pem,
            device_group=self.device_group,
        )
        self.enrolled[req.device_id] = resp
        return ENROLLED_STATUS, msgspec.json.encode(resp)

    def _sign(self, req: EnrollRequest) -> str | None:
        assert req.csr_pem is not None
        csr = x509.load_pem_x509_csr(req.csr_pem.encode())
        cn = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if not csr.is_signature_valid or [a.value for a in cn] != [req.device_id]:
            return None
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(csr.subject)
            .issuer_name(self.ca_cert.subject)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .sign(self.ca_key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM).decode()


def _refuse(status: int, reason: str, detail: str) -> tuple[int, bytes]:
    body: dict[str, Any] = {"detail": detail, "reason": reason}
    return status, json.dumps(body).encode()
