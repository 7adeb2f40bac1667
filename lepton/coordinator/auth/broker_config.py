"""The broker's initial configuration for one fleet: ``mosquitto.conf`` and the dynamic
security plugin's ``dynamic-security.json`` (``lepton broker init`` writes them).

After this, nobody edits broker files by hand: the coordinator makes and removes device
accounts at run time through the plugin (:mod:`lepton.coordinator.auth.broker_accounts`).
The JSON holds one client, the coordinator, with two roles: ``lepton-coordinator`` (the
fleet's device topics in, its command topics out) and ``lepton-dynsec-admin`` (the plugin's
control topics). The default ACL access denies publishing, receiving and subscribing to
every client no role allows, so a device holds exactly what its own role grants.

Password hashes are what Mosquitto 2.0's plugin reads back (plugins/dynamic-security,
clients.c and auth.c): PBKDF2-HMAC-SHA512, a 12-byte salt, a 64-byte key, both base64, and
the iteration count. The coordinator's password is 32 random bytes, so the iteration count
(the plugin's own default, 101) adds nothing to what guessing would cost.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from lepton.coordinator.auth import dynsec
from lepton.protocol import topics

SALT_BYTES: Final = 12  # SALT_LEN in mosquitto's src/password_mosq.h (2.0)
HASH_BYTES: Final = 64
ITERATIONS: Final = 101  # PW_DEFAULT_ITERATIONS
COORDINATOR_ROLE: Final = "lepton-coordinator"
ADMIN_ROLE: Final = "lepton-dynsec-admin"
PLUGIN_NAME: Final = "mosquitto_dynamic_security.so"
PLUGIN_DIRS: Final = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib/arm-linux-gnueabihf",
    "/usr/lib/mosquitto",
    "/usr/local/lib",
    "/usr/lib",
    "/opt/homebrew/lib",
)


def find_plugin() -> str | None:
    """The dynamic security plugin in the usual library folders, or None."""
    for folder in PLUGIN_DIRS:
        path = Path(folder) / PLUGIN_NAME
        if path.is_file():
            return str(path)
    return None


def password_hash(password: str, salt: bytes | None = None) -> dict[str, Any]:
    """The ``password``, ``salt`` and ``iterations`` fields of a dynsec client."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    if len(salt) != SALT_BYTES:
        raise ValueError(f"the plugin reads {SALT_BYTES}-byte salts only")
    key = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, ITERATIONS, HASH_BYTES)
    return {
        "password": base64.b64encode(key).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": ITERATIONS,
    }


def _acl(acltype: str, topic: str) -> dict[str, Any]:
    return {"acltype": acltype, "topic": topic, "allow": True, "priority": 0}


def dynsec_document(fleet: str, coordinator_user: str, password: str) -> dict[str, Any]:
    """The plugin's whole starting state for one fleet (see the module doc)."""
    fleet = topics.validate_id(fleet, what="fleet")
    user = topics.validate_id(coordinator_user, what="coordinator user")
    root = f"{topics.ROOT}/{topics.TOPIC_VERSION}/{fleet}"
    control = "$CONTROL/dynamic-security/#"
    return {
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": False,
            "subscribe": False,
            "unsubscribe": True,
        },
        "clients": [
            {
                "username": user,
                "textname": "Lepton coordinator",
                **password_hash(password),
                "roles": [{"rolename": COORDINATOR_ROLE}, {"rolename": ADMIN_ROLE}],
            }
        ],
        "groups": [],
        "roles": [
            {
                "rolename": COORDINATOR_ROLE,
                "textname": f"reads fleet {fleet}'s devices, commands them",
                "acls": [
                    _acl("subscribePattern", f"{root}/device/#"),
                    # Replicas split the high-volume channels through shared subscriptions;
                    # the broker checks the filter with its $share/<group>/ prefix.
                    _acl("subscribePattern", f"$share/+/{root}/device/#"),
                    _acl("publishClientReceive", f"{root}/device/#"),
                    _acl("publishClientSend", f"{root}/cmd/#"),
                ],
            },
            {
                "rolename": ADMIN_ROLE,
                "textname": "manages accounts through the dynamic security plugin",
                "acls": [
                    _acl("publishClientSend", control),
                    _acl("subscribePattern", control),
                    _acl("publishClientReceive", control),
                ],
            },
        ],
    }


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokerInit:
    """What ``lepton broker init`` was asked for."""

    directory: Path
    fleet: str
    coordinator_user: str = "coordinator"
    port: int = 1883  # 0: no plain listener (then tls_port is needed)
    bind: str = "127.0.0.1"
    tls_port: int | None = None
    tls_bind: str = ""  # address of the TLS listener ('': every interface, for devices)
    cafile: str = ""
    certfile: str = ""
    keyfile: str = ""
    plugin: str = ""
    # The user mosquitto switches to when started as root (its default: "mosquitto"); it
    # must be able to write dynamic-security.json and the data directory.
    run_as: str = ""
    # Where mosquitto runs from; the config names files by these absolute paths.
    data_dir: Path | None = None

    def __post_init__(self) -> None:
        topics.validate_id(self.fleet, what="fleet")
        topics.validate_id(self.coordinator_user, what="coordinator user")
        if self.tls_port is not None and not (self.cafile and self.certfile and self.keyfile):
            raise ValueError("a TLS listener needs cafile, certfile and keyfile")
        if self.port == 0 and self.tls_port is None:
            raise ValueError("port 0 (no plain listener) needs a TLS listener (tls_port)")

    @property
    def conf_path(self) -> Path:
        return self.directory / "mosquitto.conf"

    @property
    def dynsec_path(self) -> Path:
        return self.directory / "dynamic-security.json"

    @property
    def password_path(self) -> Path:
        return self.directory / f"{self.coordinator_user}.password"


def mosquitto_conf(init: BrokerInit, plugin: str) -> str:
    """``mosquitto.conf`` text: listeners, the plugin, persistence."""
    d = init.directory.resolve()
    data = (init.data_dir or d / "data").resolve()
    lines = [
        f"# Mosquitto for Lepton fleet {init.fleet!r}, written by `lepton broker init`.",
        "# Device accounts are not in this file: the coordinator makes and removes them at",
        f"# run time through the dynamic security plugin ({dynsec.CONTROL_TOPIC}), which",
        "# keeps them in dynamic-security.json: the user mosquitto runs as (`user`, default",
        "# mosquitto) must own it and the persistence directory (chown them after init).",
        *([f"user {init.run_as}"] if init.run_as else []),
        "per_listener_settings false",
        "allow_anonymous false",
        "# Send small packets at once: without it a reply that follows an acknowledgement",
        "# waits for the client's delayed ACK (~40 ms on Linux) behind Nagle's algorithm.",
        "set_tcp_nodelay true",
        f"plugin {plugin}",
        f"plugin_opt_config_file {d / 'dynamic-security.json'}",
        "",
        "# Each listener repeats this (a per-listener option): the client id becomes the",
        "# username, so no client can take over another's session.",
    ]
    if init.port:
        lines += [f"listener {init.port} {init.bind}".rstrip(), "use_username_as_clientid true"]
    if init.tls_port is not None:
        lines += [
            *([""] if init.port else []),
            "# TLS listener for devices.",
            f"listener {init.tls_port} {init.tls_bind}".rstrip(),
            "use_username_as_clientid true",
            f"cafile {Path(init.cafile).resolve()}",
            f"certfile {Path(init.certfile).resolve()}",
            f"keyfile {Path(init.keyfile).resolve()}",
            "tls_version tlsv1.2",
        ]
    lines += [
        "",
        "# Persistence every few seconds (agents and the coordinator re-send what is lost).",
        "persistence true",
        f"persistence_location {data}/",
        "autosave_interval 5",
        "max_queued_messages 10000",
        "# Lepton control messages are small; bulk data goes over HTTP.",
        "message_size_limit 262144",
        "persistent_client_expiration 7d",
    ]
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str, mode: int) -> None:
    # Created with its final mode, never briefly readable by others.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    path.chmod(mode)


def write_broker_files(init: BrokerInit, *, force: bool = False) -> str:
    """Write the three files into ``init.directory``; return the coordinator's password.

    Refuses (FileExistsError) to overwrite an existing configuration unless ``force``: a
    second run would otherwise replace the coordinator's password and drop every device
    account the plugin has saved.
    """
    plugin = init.plugin or find_plugin()
    if not plugin:
        raise FileNotFoundError(
            f"{PLUGIN_NAME} not found in {', '.join(PLUGIN_DIRS)}; give its path with --plugin"
        )
    paths = (init.conf_path, init.dynsec_path, init.password_path)
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise FileExistsError(f"already there (--force replaces them): {', '.join(existing)}")
    init.directory.mkdir(parents=True, exist_ok=True)
    (init.data_dir or init.directory / "data").mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(32)
    document = dynsec_document(init.fleet, init.coordinator_user, password)
    _write(init.dynsec_path, json.dumps(document, indent=2) + "\n", 0o600)
    _write(init.password_path, password + "\n", 0o600)
    _write(init.conf_path, mosquitto_conf(init, plugin), 0o644)
    return password
