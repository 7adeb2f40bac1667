"""A fleet CA for tests, made with :mod:`lepton.coordinator.auth.pki`, and Mosquitto TLS
listeners that use its certificates.

``fleet = make_fleet(tmp_path / "pki")`` writes ``ca.crt``/``ca.key`` and a server
certificate for ``localhost`` and ``127.0.0.1``; ``fleet.issue_server(...)`` and
``fleet.device(...)`` add more; :func:`tls_listener` is a listener block for
:class:`~tests.support.broker.Broker`'s ``extra_config``.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from lepton.coordinator.auth import cafiles
from lepton.coordinator.auth.pki import FleetCA, Issued, device_key_and_csr


@dataclass
class Fleet:
    """A CA in ``dir`` with ``server.crt``/``server.key`` for localhost and 127.0.0.1."""

    dir: Path
    ca: FleetCA

    @property
    def ca_file(self) -> Path:
        return self.dir / cafiles.CA_CERT

    @property
    def server_cert(self) -> Path:
        return self.dir / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.dir / "server.key"

    def issue_server(self, stem: str, sans: list[str]) -> tuple[Path, Path]:
        return cafiles.save_issued(self.dir, stem, self.ca.issue_server(sans))

    def device(self, device_id: str, *, cn: str | None = None) -> tuple[Path, Path]:
        """A device key and the certificate the CA signs from its CSR (``cn``: another CN in
        the certificate than ``device_id``, for a device that claims someone else's id)."""
        name = cn or device_id
        key, csr = device_key_and_csr(name)
        cert = self.ca.sign_device_csr(csr, name, 30)
        return cafiles.save_issued(self.dir, f"device-{device_id}", Issued(cert, key))

    def server_context(self, *, client_ca: bool = False) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(self.server_cert), str(self.server_key))
        if client_ca:
            ctx.load_verify_locations(str(self.ca_file))
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


def make_fleet(directory: Path, name: str = "Test fleet CA") -> Fleet:
    ca = FleetCA.create(name)
    cafiles.save_ca(directory, ca)
    cafiles.save_issued(directory, "server", ca.issue_server(["localhost", "127.0.0.1"]))
    return Fleet(directory, ca)


def tls_listener(
    port: int,
    fleet: Fleet,
    *,
    cert: Path | None = None,
    key: Path | None = None,
    require_certificate: bool = False,
) -> str:
    """A Mosquitto listener block on 127.0.0.1:``port`` serving ``cert`` (default: the
    fleet's server certificate); with ``require_certificate``, clients must present one the
    fleet CA signed, and its CN becomes their username."""
    block = f"""
listener {port} 127.0.0.1
cafile {fleet.ca_file}
certfile {cert or fleet.server_cert}
keyfile {key or fleet.server_key}
tls_version tlsv1.2
"""
    if require_certificate:
        block += "require_certificate true\nuse_identity_as_username true\n"
    return block
