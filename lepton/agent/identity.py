"""The device's identity: what enrolment wrote into the state directory, read back at start.

``lepton-agent enroll`` (:mod:`lepton.agent.enrol`) writes ``identity.json`` (the device id,
fleet, HTTP token, MQTT account, coordinator URL, group), ``fleet-ca.pem`` and, with a CSR,
``client.key`` and ``client.crt``: each mode 0600, each written atomically (temporary file,
fsync, rename), so a power cut leaves the old file or the new one, never half of one.

At start-up :func:`read_identity` refuses an ``identity.json`` that other users could read or
write (mode must be 0600 or 0400, as ssh treats a private key): it holds credentials.
:func:`identity_layer` turns an identity into config values (see
:func:`lepton.agent.config.load_config` for how they are layered).
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import msgspec

from lepton.common import settings
from lepton.common.errors import ConfigError
from lepton.protocol.enrolment import (
    CA_FILE,
    CLIENT_CERT_FILE,
    CLIENT_KEY_FILE,
    IDENTITY_FILE,
    EnrollResponse,
    MqttAccount,
)

SECRET_MODE: Final = 0o600
#: Keys the identity decides: an explicit different value is a config error.
AUTHORITATIVE: Final = (
    "device.id",
    "device.fleet",
    "broker.username",
    "broker.password",
    "fetch.http_token",
)
#: Keys that are secrets: an error names them but never shows their values.
SECRET_KEYS: Final = frozenset({"broker.password", "fetch.http_token"})


class IdentityFile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``identity.json`` as stored (schema 1)."""

    schema: int = 1
    device_id: str
    fleet: str
    http_token: str
    coordinator_url: str
    mqtt: MqttAccount
    device_group: str | None = None


@dataclass(frozen=True, slots=True)
class Identity:
    """An identity read from ``state_dir``, with the paths of the files enrolment left."""

    state_dir: Path
    data: IdentityFile
    ca_file: Path | None  # fleet-ca.pem, when the fleet has a CA
    cert_file: Path | None  # client.crt and client.key, both present
    key_file: Path | None

    def __repr__(self) -> str:  # the dataclass repr would show the token and password
        return f"Identity({self.data.device_id!r}, fleet={self.data.fleet!r}, dir={self.state_dir})"


def from_response(resp: EnrollResponse) -> IdentityFile:
    return IdentityFile(
        device_id=resp.device_id,
        fleet=resp.fleet,
        http_token=resp.http_token,
        coordinator_url=resp.coordinator_url,
        mqtt=resp.mqtt,
        device_group=resp.device_group,
    )


def identity_path(state_dir: Path) -> Path:
    return state_dir / IDENTITY_FILE


def check_private(path: Path, st: os.stat_result | None = None) -> None:
    """:class:`ConfigError` unless ``path`` is readable by its owner only (0600 or 0400)."""
    st = st or path.stat()
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise ConfigError(
            f"{path} is mode {stat.S_IMODE(st.st_mode):04o}: it holds this device's "
            f"credentials and must be readable by its owner only (chmod 600 {path})",
            key="identity",
            source=str(path),
        )


def read_identity(state_dir: Path) -> Identity | None:
    """The identity in ``state_dir``, None if there is none; :class:`ConfigError` if it is
    readable by others or malformed."""
    path = identity_path(state_dir)
    try:
        with path.open("rb") as fh:
            check_private(path, os.fstat(fh.fileno()))  # the file opened, not a swapped one
            raw = fh.read(64 * 1024)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}", key="identity", source=str(path)) from exc
    try:
        data = msgspec.json.decode(raw, type=IdentityFile)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ConfigError(
            f"{path} is not a valid identity ({exc}); enrol again with --force",
            key="identity",
            source=str(path),
        ) from exc
    ca, cert, key = (state_dir / n for n in (CA_FILE, CLIENT_CERT_FILE, CLIENT_KEY_FILE))
    if key.exists():
        check_private(key)
    has_pair = cert.exists() and key.exists()
    return Identity(
        state_dir=state_dir,
        data=data,
        ca_file=ca if ca.exists() else None,
        cert_file=cert if has_pair else None,
        key_file=key if has_pair else None,
    )


def identity_layer(identity: Identity) -> dict[str, Any]:
    """Dotted config keys and the values the identity gives them."""
    d = identity.data
    values: dict[str, Any] = {
        "device.id": d.device_id,
        "device.fleet": d.fleet,
        "broker.username": d.mqtt.username,
        "broker.password": d.mqtt.password,
        "broker.host": d.mqtt.host,
        "broker.port": d.mqtt.port,
        "broker.tls": d.mqtt.tls,
        "fetch.coordinator_url": d.coordinator_url,
        "fetch.http_token": d.http_token,
    }
    if identity.ca_file is not None:
        values["broker.ca_file"] = identity.ca_file
        values["fetch.ca_file"] = identity.ca_file
    if identity.cert_file is not None:
        values["broker.cert_file"] = identity.cert_file
        values["broker.key_file"] = identity.key_file
    return values


def explicit_keys(
    data: Mapping[str, Any] | None,
    env: Mapping[str, str],
    overrides: Mapping[str, Any] | None,
    known: Iterable[str],
) -> set[str]:
    """The dotted keys (of ``known``) a file, the environment or a flag set."""
    found = {
        f"{section}.{name}"
        for section, table in (data or {}).items()
        if isinstance(table, Mapping)
        for name in table
    }
    found |= {k for k in known if settings.env_name(k) in env}
    found |= {k for k, v in (overrides or {}).items() if v is not None}
    return found


def layered(
    data: Mapping[str, Any] | None,
    layer: Mapping[str, Any],
    explicit: set[str],
    config: Any,
    identity: Identity,
) -> dict[str, Any]:
    """The file's tables with the identity's values added where nothing explicit set them;
    an explicit value of a key the identity decides must equal it (``config``: the config
    built without the identity, to compare with)."""
    merged: dict[str, Any] = {
        k: dict(v) if isinstance(v, Mapping) else v for k, v in (data or {}).items()
    }
    for key, value in layer.items():
        if key in explicit:
            _check_agrees(config, key, value, identity)
            continue
        section, name = key.split(".")
        merged.setdefault(section, {})[name] = str(value) if isinstance(value, Path) else value
    return merged


def _check_agrees(config: Any, key: str, value: Any, identity: Identity) -> None:
    if key not in AUTHORITATIVE:
        return
    section, name = key.split(".")
    have = getattr(getattr(config, section), name)
    if have == value:
        return
    shown = (
        "a different value"
        if key in SECRET_KEYS
        else f"{have!r}, but this device is enrolled as {value!r}"
    )
    raise ConfigError(
        f"{key} is set to {shown} ({identity_path(identity.state_dir)}); remove the setting, "
        "or enrol again (lepton-agent enroll --force)",
        key=key,
    )


def write_private(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` mode 0600, atomically: a temporary file in the same
    directory (created 0600, never wider), fsynced, renamed over ``path``, the directory
    fsynced. ``durable=False`` skips the fsyncs (a simulator's many throwaway devices)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, SECRET_MODE)
    try:
        os.fchmod(fd, SECRET_MODE)  # an old temporary file may have had another mode
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    if durable:
        with contextlib.suppress(OSError):  # a directory fsync is not possible everywhere
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)


def write_identity(
    state_dir: Path,
    resp: EnrollResponse,
    *,
    key_pem: bytes | None = None,
    durable: bool = True,
) -> list[Path]:
    """Write what enrolment returned into ``state_dir`` (made 0700 if missing); returns the
    files written. ``identity.json`` goes last: its presence means the rest is complete."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    written: list[Path] = []
    files: list[tuple[str, bytes]] = []
    if resp.ca_pem:
        files.append((CA_FILE, resp.ca_pem.encode()))
    if key_pem is not None and resp.cert_pem:
        files += [(CLIENT_KEY_FILE, key_pem), (CLIENT_CERT_FILE, resp.cert_pem.encode())]
    files.append((IDENTITY_FILE, msgspec.json.format(msgspec.json.encode(from_response(resp)))))
    # Files of an earlier identity that this one has no counterpart for would be read back
    # as its own (a CA the fleet no longer uses, a certificate for another key): removed
    # first, while identity.json still names the old device or none.
    keep = {name for name, _ in files}
    for name in (IDENTITY_FILE, CA_FILE, CLIENT_CERT_FILE, CLIENT_KEY_FILE):
        if name not in keep:
            (state_dir / name).unlink(missing_ok=True)
    for name, data in files:
        path = state_dir / name
        write_private(path, data, durable=durable)
        written.append(path)
    return written
