"""TLS client contexts, built with the standard library only (``ssl``): the agent's MQTT
link and HTTPS fetches and the coordinator's MQTT link all connect through one of these.

A context checks the certificate chain *and* the host name, TLS 1.2 at least. Without a CA
file the system's trust store is used (a server behind a public certificate); with one, only
that CA is trusted (the fleet CA, which a device gets at enrolment).
"""

from __future__ import annotations

import ssl
from pathlib import Path

from lepton.common.errors import ConfigError


def client_context(
    ca_file: str | Path | None,
    cert_file: str | Path | None = None,
    key_file: str | Path | None = None,
    *,
    what: str = "tls",
) -> ssl.SSLContext:
    """A client context that verifies the server against ``ca_file`` (else the system's
    CAs) and its host name, presenting ``cert_file``/``key_file`` when given.
    :class:`ConfigError` (naming ``what``) when a file cannot be loaded."""
    try:
        if ca_file is not None:
            # Only the fleet CA, not the system store as well: a public CA's certificate for
            # the same name must not be accepted in the fleet CA's place.
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.load_verify_locations(cafile=str(ca_file))
        else:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        # PROTOCOL_TLS_CLIENT and create_default_context set both already; they are the point.
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if cert_file is not None:
            ctx.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{what}: cannot load TLS files: {exc}", key=what) from exc
    return ctx
