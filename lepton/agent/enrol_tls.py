"""What the enrolment connection trusts, settled before the claim is sent (the kubeadm way).

- ``ca_file`` given: that CA only.
- A pin (``sha256`` of the fleet CA certificate's DER) and no ``ca_file``: the server's
  certificate chain is read in a handshake that sends nothing else (no request, no claim),
  and if a certificate in it has the pinned hash, the enrolment connection then verifies the
  server (chain and host name) against that CA alone. A server that does not send its CA in
  the chain leaves the system's trust store to verify it; the CA in the answer is checked
  against the pin either way (:func:`lepton.agent.enrol.check_pin`).
- Neither: the system's trust store.

Reading the unverified chain uses ``SSLSocket.get_unverified_chain`` (public from Python
3.13; the same method of the underlying ``_ssl`` object from 3.10); where neither exists the
pin only checks the answer's CA.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from lepton.common.tls import client_context

log = logging.getLogger(__name__)


def verify_for(url: str, ca_file: Path | None, pin: str | None = None) -> ssl.SSLContext | bool:
    """The httpx ``verify`` for the enrolment request to ``url`` (blocking: may connect)."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "https":
        return True
    if ca_file is not None:
        return client_context(ca_file, what="--ca-file")
    if pin is not None and parts.hostname:
        der = pinned_ca(parts.hostname, parts.port or 443, pin)
        if der is not None:
            return pinned_context(der)
        log.info("the server's chain has no certificate with the pinned hash; system trust")
    return client_context(None, what="system trust store")


def pinned_context(ca_der: bytes) -> ssl.SSLContext:
    """A client context that trusts ``ca_der`` only, host names checked, TLS 1.2 at least."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cadata=ca_der)
    return ctx


def pinned_ca(host: str, port: int, pin: str, timeout: float = 10.0) -> bytes | None:
    """The DER of the certificate in ``host``'s presented chain whose SHA-256 is ``pin``,
    or None (not in the chain, or the chain cannot be read). Sends nothing but a handshake."""
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    probe.check_hostname = False  # nothing is trusted from this connection but the pin match
    probe.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            probe.wrap_socket(raw, server_hostname=host) as tls,
        ):
            chain = _unverified_chain(tls)
    except OSError as exc:
        log.info("could not read %s:%d's certificate chain: %s", host, port, exc)
        return None
    for der in chain:
        if hashlib.sha256(der).hexdigest() == pin:
            return der
    return None


def _unverified_chain(tls: ssl.SSLSocket) -> list[bytes]:
    getter: Any = getattr(tls, "get_unverified_chain", None)
    if getter is None:  # before 3.13: the same method on the _ssl object
        getter = getattr(getattr(tls, "_sslobj", None), "get_unverified_chain", None)
    if getter is None:
        return []
    out: list[bytes] = []
    for cert in getter() or []:
        if isinstance(cert, bytes):
            out.append(cert)
        else:  # _ssl.Certificate
            out.append(cert.public_bytes(ssl._ssl.ENCODING_DER))  # type: ignore[attr-defined]
    return out
