"""The demo fleet's trust, made the way an operator makes it: a fleet CA (``lepton ca init``)
and, for Mosquitto, the broker's configuration (``lepton broker init``: the dynamic security
plugin, a TLS listener with the CA's server certificate, the coordinator's account).

Both commands run as child processes at once (neither reads what the other writes: the
broker's configuration only names the certificate files), so the trust costs one CLI start-up
of wall time. The broker has no plain listener: the coordinator and every device connect over
TLS, so nothing needs one.
"""

from __future__ import annotations

import getpass
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lepton.common.errors import LeptonError

#: The names the demo's clients use for this host (the server certificate's SANs).
SANS = ("127.0.0.1", "localhost")
#: The coordinator's broker account (``lepton broker init --coordinator-user``).
COORDINATOR_USER = "coordinator"


class TrustError(LeptonError, RuntimeError):
    """``lepton ca init`` or ``lepton broker init`` failed; the message has its output."""


@dataclass(frozen=True, slots=True)
class Trust:
    """The files of the fleet CA in ``ca_dir`` and, for Mosquitto, of the broker in
    ``broker_dir`` (None: a broker without accounts or TLS)."""

    ca_dir: Path
    broker_dir: Path | None = None
    tls_port: int | None = None

    @property
    def ca_file(self) -> Path:
        return self.ca_dir / "ca.crt"

    @property
    def ca_key_file(self) -> Path:
        return self.ca_dir / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.ca_dir / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.ca_dir / "server.key"

    @property
    def broker_conf(self) -> Path | None:
        return None if self.broker_dir is None else self.broker_dir / "mosquitto.conf"

    @property
    def dynsec_file(self) -> Path | None:
        return None if self.broker_dir is None else self.broker_dir / "dynamic-security.json"

    @property
    def password_file(self) -> Path | None:
        if self.broker_dir is None:
            return None
        return self.broker_dir / f"{COORDINATOR_USER}.password"


def _lepton(args: Sequence[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "lepton.coordinator.cli", *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )


def make_trust(
    workdir: Path,
    *,
    fleet: str,
    tls_port: int | None,
    env: dict[str, str],
    log: Path,
    timeout: float = 60.0,
) -> Trust:
    """Run ``lepton ca init`` into ``workdir/ca`` and, with a ``tls_port``, ``lepton broker
    init`` into ``workdir/broker`` (TLS only, on that port); the files. Their output goes to
    ``log``; :class:`TrustError` (with that output) when either fails."""
    trust = Trust(
        ca_dir=workdir / "ca",
        broker_dir=None if tls_port is None else workdir / "broker",
        tls_port=tls_port,
    )
    san = [x for name in SANS for x in ("--san", name)]
    commands = [["ca", "init", "--dir", str(trust.ca_dir), *san]]
    if tls_port is not None:
        commands.append(
            [
                *("broker", "init", "--dir", str(trust.broker_dir), "--fleet", fleet),
                *("--coordinator-user", COORDINATOR_USER, "--port", "0"),
                *("--tls-port", str(tls_port), "--tls-bind", "127.0.0.1"),
                *("--cafile", str(trust.ca_file)),
                *("--certfile", str(trust.server_cert), "--keyfile", str(trust.server_key)),
                # As root, mosquitto would switch to its own user, who cannot write here.
                *("--run-as", getpass.getuser()),
            ]
        )
    running = [(cmd, _lepton(cmd, env, log)) for cmd in commands]
    failed = []
    for cmd, proc in running:
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        if code != 0:
            failed.append(f"`lepton {' '.join(cmd[:2])}` exited with {code}")
    if failed:
        output = log.read_text(errors="replace")[-2000:]
        raise TrustError(f"{'; '.join(failed)}:\n{output}")
    return trust
