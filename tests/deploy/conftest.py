"""A real mosquitto running the shipped templates (deploy/mosquitto/), rendered for a test.

Only what must differ on a test machine changes: the port, the password, ACL and
persistence paths, the user to run as and the log file. Every security option is the
shipped one, so these tests fail when a template regresses.
"""

from __future__ import annotations

import getpass
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.broker import Broker, mosquitto_binary

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto"


def render_acl(fleet: str, *, extra: str = "") -> str:
    """The shipped ACL for one fleet (the ``sed`` its header describes), plus ``extra``."""
    return (DEPLOY / "lepton.acl").read_text().replace("{fleet}", fleet) + extra


@dataclass
class ShippedBroker(Broker):
    """A :class:`Broker` whose config is the shipped mosquitto.conf, rendered for a test."""

    passwd: Path | None = None
    acl: Path | None = None

    def write_config(self) -> None:
        assert self.passwd is not None
        assert self.acl is not None
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        text = (DEPLOY / "mosquitto.conf").read_text()
        for old, new in {
            "listener 1883 127.0.0.1": f"listener {self.port} 127.0.0.1",
            "/etc/mosquitto/lepton.passwd": str(self.passwd),
            "/etc/mosquitto/lepton.acl": str(self.acl),
            "/var/lib/mosquitto/": f"{data}/",
        }.items():
            assert old in text, f"mosquitto.conf no longer has {old!r}; update this renderer"
            text = text.replace(old, new)
        self.conf_path.write_text(
            f"user {getpass.getuser()}\nlog_dest file {self.log_path}\n"
            "log_type error\nlog_type warning\nlog_type notice\n" + text + self.extra_config
        )


def password_file(path: Path, users: dict[str, str]) -> Path:
    """A mosquitto password file made with ``mosquitto_passwd -b``."""
    path.touch()
    for user, password in users.items():
        subprocess.run(["mosquitto_passwd", "-b", str(path), user, password], check=True)
    path.chmod(0o600)
    return path


ShippedFactory = Callable[..., ShippedBroker]


@pytest.fixture
def shipped_broker_factory(tmp_path: Path) -> Iterator[ShippedFactory]:
    """``make(users, fleet="default", acl_extra="", extra_config="")``: a started broker on the
    shipped templates (``extra_config`` appended: another rendered listener); ``users`` maps
    username -> password."""
    if mosquitto_binary() is None:
        pytest.fail("mosquitto binary not found; scripts/test installs it")
    started: list[ShippedBroker] = []

    def make(
        users: dict[str, str],
        *,
        fleet: str = "default",
        acl_extra: str = "",
        extra_config: str = "",
    ) -> ShippedBroker:
        workdir = tmp_path / f"shipped{len(started)}"
        workdir.mkdir()
        acl = workdir / "lepton.acl"
        acl.write_text(render_acl(fleet, extra=acl_extra))
        b = ShippedBroker(
            workdir=workdir,
            extra_config=extra_config,
            passwd=password_file(workdir / "passwd", users),
            acl=acl,
        )
        started.append(b)
        b.start()
        return b

    yield make
    for b in started:
        b.kill()
