"""Enrolment with a fleet CA (``[auth] ca_file``, ``ca_key_file``, from ``lepton ca``): the
device gets the CA and, for its CSR, a client certificate for its own id; operators see the
CA's fingerprint with each claim; a CSR for another name is refused."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.x509.oid import NameOID

from lepton.coordinator.auth.cafiles import CA_CERT, CA_KEY, save_ca
from lepton.coordinator.auth.enrolment_store import EnrolmentStore
from lepton.coordinator.auth.pki import FleetCA, device_key_and_csr
from lepton.coordinator.service import Coordinator
from lepton.protocol import routes
from tests.coordinator.auth.enrolling import bearer, enroll, operator_token

MakeCoordinator = Callable[..., contextlib.AbstractAsyncContextManager[Coordinator]]


async def test_a_csr_is_signed_by_the_fleet_ca(
    make_coordinator: MakeCoordinator, tmp_path: Path
) -> None:
    ca = FleetCA.create()
    save_ca(tmp_path / "ca", ca)
    async with (
        make_coordinator(
            auth__ca_file=str(tmp_path / "ca" / CA_CERT),
            auth__ca_key_file=str(tmp_path / "ca" / CA_KEY),
            auth__cert_days=30,
        ) as c,
        httpx.AsyncClient(base_url=str(c.api_url), timeout=10) as api,
    ):
        op = operator_token(c)
        r = await api.post(routes.CLAIMS, json={"count": 2}, headers=bearer(op))
        made = r.json()
        assert made["ca_sha256"] == ca.fingerprint
        first, second = (m["token"] for m in made["claims"])
        _key, csr = device_key_and_csr("dev-1")
        r = await enroll(api, first, "dev-1", csr_pem=csr.decode())
        assert r.status_code == 201, r.text
        out = r.json()
        assert out["ca_pem"] == ca.cert_pem.decode()
        cert = x509.load_pem_x509_certificate(out["cert_pem"].encode())
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        assert cn == "dev-1"
        cert.verify_directly_issued_by(ca.cert)
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        assert 29 <= lifetime.days <= 31
        identity = EnrolmentStore(c.store.engine).identity("dev-1")
        assert identity is not None
        # A CSR for another name uses nothing of the claim.
        _key, other = device_key_and_csr("someone-else")
        r = await enroll(api, second, "dev-2", csr_pem=other.decode())
        assert (r.status_code, r.json()["reason"]) == (422, "bad_csr")
        r = await enroll(api, second, "dev-2", csr_pem="not a CSR")
        assert (r.status_code, r.json()["reason"]) == (422, "bad_csr")
        assert (await enroll(api, second, "dev-2")).status_code == 201
