"""``lepton ca``: init, refusing to overwrite, issuing, signing a CSR, the fingerprint."""

from __future__ import annotations

import json
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from lepton.coordinator.auth.pki import ca_fingerprint, device_key_and_csr
from lepton.coordinator.cli.main import main

REPO = Path(__file__).resolve().parents[3]


def _sans(path: Path) -> list[str]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(v) for v in ext.get_values_for_type(x509.DNSName)] + [
        str(v) for v in ext.get_values_for_type(x509.IPAddress)
    ]


def test_init_makes_ca_and_server_cert_and_prints_the_fingerprint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "pki"
    assert main(["ca", "init", "--dir", str(d), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fingerprint"] == ca_fingerprint((d / "ca.crt").read_bytes())
    assert stat.S_IMODE((d / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((d / "server.key").stat().st_mode) == 0o600
    sans = _sans(d / "server.crt")
    assert {"localhost", "127.0.0.1", socket.gethostname()} <= set(sans)
    # The chain a server presents: its own certificate, then the CA (what a pin looks for).
    leaf, ca = x509.load_pem_x509_certificates((d / "server.crt").read_bytes())
    assert ca == x509.load_pem_x509_certificate((d / "ca.crt").read_bytes())
    assert leaf.issuer == ca.subject
    # A second init keeps the CA; --force replaces it.
    assert main(["ca", "init", "--dir", str(d)]) == 1
    assert "already holds a CA" in capsys.readouterr().err
    assert ca_fingerprint((d / "ca.crt").read_bytes()) == out["fingerprint"]
    assert main(["ca", "init", "--dir", str(d), "--force", "--san", "broker.example"]) == 0
    assert ca_fingerprint((d / "ca.crt").read_bytes()) != out["fingerprint"]
    assert _sans(d / "server.crt") == ["broker.example"]


def test_issue_server_client_sign_csr_and_fingerprint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "pki"
    assert main(["ca", "init", "--dir", str(d), "--san", "localhost"]) == 0
    capsys.readouterr()
    argv = ["ca", "issue-server", "--dir", str(d), "--san", "mqtt.example", "--san", "10.1.2.3"]
    assert main([*argv, "--out", "broker"]) == 0
    assert _sans(d / "broker.crt") == ["mqtt.example", "10.1.2.3"]
    assert main(["ca", "issue-server", "--dir", str(d), "--san", "bad name"]) == 1
    assert "bad_san" in capsys.readouterr().err
    assert main(["ca", "issue-client", "--dir", str(d), "--identity", "coordinator-1"]) == 0
    cert = x509.load_pem_x509_certificate((d / "coordinator-1.crt").read_bytes())
    assert cert.subject.rfc4514_string() == "CN=coordinator-1"
    _, csr = device_key_and_csr("dev-3")
    (tmp_path / "dev-3.csr").write_bytes(csr)
    sign = ["ca", "sign-csr", "--dir", str(d), "--csr", str(tmp_path / "dev-3.csr")]
    assert main([*sign, "--device", "dev-4", "--out", str(tmp_path / "x.crt")]) == 1
    assert "wrong_cn" in capsys.readouterr().err
    assert not (tmp_path / "x.crt").exists()
    assert main([*sign, "--device", "dev-3", "--out", str(tmp_path / "dev-3.crt")]) == 0
    capsys.readouterr()
    assert main(["ca", "fingerprint", "--dir", str(d)]) == 0
    assert capsys.readouterr().out.strip() == ca_fingerprint((d / "ca.crt").read_bytes())


def test_the_group_is_mounted_in_the_lepton_command(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lepton.coordinator.cli",
            "ca",
            "fingerprint",
            "--dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert "no_ca" in proc.stderr
