"""The one TLS client context: chain and host name checked, the given CA only."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from lepton.common.errors import ConfigError
from lepton.common.tls import client_context
from tests.support.pki import make_fleet


def test_context_checks_chain_and_host_name_with_only_the_given_ca(tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path / "pki")
    ctx = client_context(fleet.ca_file)
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    # The fleet CA alone: no system CA is trusted in its place.
    assert [c["subject"] for c in ctx.get_ca_certs()] == [((("commonName", "Test fleet CA"),),)]
    system = client_context(None)
    assert system.check_hostname
    assert system.verify_mode == ssl.CERT_REQUIRED


def test_unreadable_files_are_a_config_error_naming_the_key(tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path / "pki")
    with pytest.raises(ConfigError) as err:
        client_context(tmp_path / "missing.crt", what="broker")
    assert err.value.key == "broker"
    cert, _ = fleet.device("dev-1")
    with pytest.raises(ConfigError):  # a key that does not belong to the certificate
        client_context(fleet.ca_file, cert, fleet.server_key)
