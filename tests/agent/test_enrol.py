"""``lepton-agent enroll``: the real command against a test server that speaks the enrolment
contract (tests.support.enrolserver), the identity files it leaves, and its refusals."""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from lepton.agent.cli import main
from lepton.protocol.enrolment import CA_FILE, CLIENT_CERT_FILE, CLIENT_KEY_FILE, IDENTITY_FILE
from tests.support.agents import enrol_agent
from tests.support.enrolserver import FakeEnrolment
from tests.support.httpserver import HttpServer


@pytest.fixture
def coord() -> Iterator[tuple[HttpServer, FakeEnrolment]]:
    with HttpServer() as server:
        fake = FakeEnrolment(server.base_url, broker_port=18830, device_group="lab")
        server.post_handler = fake
        yield server, fake


def _config(tmp_path: Path, name: str = "agent.toml") -> Path:
    state = tmp_path / "state"
    path = tmp_path / name
    path.write_text(f'[device]\nclass = "rpi4"\n[agent]\nstate_dir = "{state}"\n')
    return path


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_enrol_writes_identity_files_0600(
    coord: tuple[HttpServer, FakeEnrolment], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server, fake = coord
    claim = fake.claim()
    cfg = _config(tmp_path)
    rc = main(
        [
            "enroll",
            server.base_url,
            claim,
            "--config",
            str(cfg),
            "--device-id",
            "pi-7",
            "--ca-sha256",
            fake.ca_pin,
            "--csr",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    state = tmp_path / "state"
    names = {IDENTITY_FILE, CA_FILE, CLIENT_CERT_FILE, CLIENT_KEY_FILE}
    assert {p.name for p in state.iterdir()} == names  # no temporary file left behind
    assert all(_mode(state / n) == 0o600 for n in names)
    ident = json.loads((state / IDENTITY_FILE).read_text())
    sent = fake.enrolled["pi-7"]
    assert ident["device_id"] == "pi-7"
    assert ident["fleet"] == "default"
    assert ident["http_token"] == sent.http_token
    assert ident["http_token"].startswith("lpd_")
    assert ident["mqtt"]["password"] == sent.mqtt.password
    assert ident["coordinator_url"] == server.base_url
    assert ident["device_group"] == "lab"
    assert (state / CA_FILE).read_text() == fake.ca_pem
    # The key was made here and never sent; the certificate is for that key and this id.
    (post,) = [r for r in server.requests if r.method == "POST"]
    assert post.headers["Authorization"] == f"Bearer {claim}"
    key = serialization.load_pem_private_key((state / CLIENT_KEY_FILE).read_bytes(), None)
    cert = x509.load_pem_x509_certificate((state / CLIENT_CERT_FILE).read_bytes())
    assert cert.public_key() == key.public_key()
    assert cert.subject.rfc4514_string() == "CN=pi-7"
    assert "enrolled pi-7" in out
    assert "systemctl enable --now lepton-agent" in out
    assert sent.http_token not in out  # secrets are not printed


def test_replayed_claim_prints_reason_and_writes_nothing(
    coord: tuple[HttpServer, FakeEnrolment], tmp_path: Path
) -> None:
    server, fake = coord
    claim = fake.claim()
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    first = enrol_agent(_config(tmp_path / "a"), server.base_url, claim, device_id="a")
    assert first.returncode == 0, first.stderr
    again = enrol_agent(_config(tmp_path / "b"), server.base_url, claim, device_id="b")
    assert again.returncode == 1
    assert "claim_used" in again.stderr
    assert "this claim has been used" in again.stderr
    assert not (tmp_path / "b" / "state").exists()


def test_ca_pin_mismatch_refuses_and_writes_nothing(
    coord: tuple[HttpServer, FakeEnrolment], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server, fake = coord
    wrong = "sha256:" + "ab" * 32
    rc = main(
        [
            "enroll",
            server.base_url,
            fake.claim(),
            "--config",
            str(_config(tmp_path)),
            "--ca-sha256",
            wrong,
        ]
    )
    assert rc == 1
    err = capsys.readouterr().err
    assert "ca_pin_mismatch" in err
    assert not (tmp_path / "state").exists()


def test_existing_identity_is_kept_without_force(
    coord: tuple[HttpServer, FakeEnrolment], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server, fake = coord
    cfg = str(_config(tmp_path))
    assert (
        main(["enroll", server.base_url, fake.claim(), "--config", cfg, "--device-id", "d1"]) == 0
    )
    before = (tmp_path / "state" / IDENTITY_FILE).read_bytes()
    claim = fake.claim()
    assert main(["enroll", server.base_url, claim, "--config", cfg, "--device-id", "d2"]) == 1
    assert "--force" in capsys.readouterr().err
    assert (tmp_path / "state" / IDENTITY_FILE).read_bytes() == before
    assert fake.claims[claim].uses == 1  # refused before the claim was sent
    rc = main(["enroll", server.base_url, claim, "--config", cfg, "--device-id", "d2", "--force"])
    assert rc == 0
    assert json.loads((tmp_path / "state" / IDENTITY_FILE).read_text())["device_id"] == "d2"


def test_plain_http_to_another_host_refused_before_connecting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["enroll", "http://192.0.2.10:8080", "lpc_x", "--config", str(_config(tmp_path))])
    assert rc == 2
    assert "insecure_http" in capsys.readouterr().err
    assert not (tmp_path / "state").exists()


def test_bad_pin_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(
        [
            "enroll",
            "http://127.0.0.1:9",
            "lpc_x",
            "--config",
            str(_config(tmp_path)),
            "--ca-sha256",
            "md5:1234",
        ]
    )
    assert rc == 2
    assert "sha256:<64 hex digits>" in capsys.readouterr().err


def test_unreachable_coordinator_fails_with_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with HttpServer() as server:
        url = server.base_url
    rc = main(["enroll", url, "lpc_x", "--config", str(_config(tmp_path))])
    assert rc == 1
    assert "connect_failed" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "state" / IDENTITY_FILE)


def test_https_is_verified_before_the_claim_is_sent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A coordinator whose certificate the system does not trust, and that does not present
    the pinned CA in its chain, gets no claim; with the fleet CA as --ca-file it enrols."""
    server = HttpServer()
    fake = FakeEnrolment("https://127.0.0.1")
    server.post_handler = fake
    url = fake.serve_tls(server, tmp_path)
    with server:
        claim = fake.claim()
        cfg = str(_config(tmp_path))
        for trust in ([], ["--ca-sha256", fake.ca_pin]):
            assert main(["enroll", url, claim, "--config", cfg, *trust]) == 1
            assert "untrusted_ca" in capsys.readouterr().err
            assert not server.requests  # the claim never left the device
        assert not (tmp_path / "state").exists()
        ca = str(tmp_path / "fleet-ca.pem")
        assert main(["enroll", url, claim, "--config", cfg, "--ca-file", ca]) == 0
        assert (tmp_path / "state" / IDENTITY_FILE).exists()
        assert fake.claims[claim].uses == 0


def test_a_pin_trusts_the_ca_the_server_presents_in_its_chain(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The kubeadm way: the chain is read in a handshake that sends nothing, the pinned CA
    found in it, and the claim sent over a connection verified against that CA only."""
    server = HttpServer()
    fake = FakeEnrolment("https://127.0.0.1")
    server.post_handler = fake
    url = fake.serve_tls(server, tmp_path, chain=True)
    with server:
        claim = fake.claim()
        cfg = str(_config(tmp_path))
        wrong = "sha256:" + "cd" * 32
        assert main(["enroll", url, claim, "--config", cfg, "--ca-sha256", wrong]) == 1
        assert "untrusted_ca" in capsys.readouterr().err
        assert not server.requests
        assert main(["enroll", url, claim, "--config", cfg, "--ca-sha256", fake.ca_pin]) == 0
        assert (tmp_path / "state" / CA_FILE).read_text() == fake.ca_pem


def test_an_answer_the_agent_could_not_run_with_is_refused(
    coord: tuple[HttpServer, FakeEnrolment], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server, fake = coord
    claim = fake.claim()
    real = fake.__call__

    def bent(path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        status, answer = real(path, headers, body)
        return status, answer.replace(b'"http_token":"lpd_', b'"http_token":"lpd_ \\r\\nX: ')

    server.post_handler = bent
    assert main(["enroll", server.base_url, claim, "--config", str(_config(tmp_path))]) == 1
    err = capsys.readouterr().err
    assert "bad_response" in err
    assert "http_token is not 1-512 printable characters" in err
    assert not (tmp_path / "state").exists()


def test_csr_without_cryptography_is_a_clear_usage_error(
    coord: tuple[HttpServer, FakeEnrolment],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server, fake = coord
    monkeypatch.setitem(sys.modules, "cryptography", None)  # import fails as if not installed
    claim = fake.claim()
    assert (
        main(["enroll", server.base_url, claim, "--config", str(_config(tmp_path)), "--csr"]) == 2
    )
    assert "--csr needs the Python package 'cryptography'" in capsys.readouterr().err
    assert fake.claims[claim].uses == 1
