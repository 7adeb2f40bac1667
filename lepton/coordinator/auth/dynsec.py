"""Mosquitto's dynamic security plugin: the commands Lepton sends it and the answers it reads.

Pure code, no I/O. The plugin (``mosquitto_dynamic_security.so``, Mosquitto >= 2.0) takes
JSON ``{"commands": [...]}`` on :data:`CONTROL_TOPIC`, runs the commands in order and
publishes one ``{"responses": [...]}`` for the whole message on :data:`RESPONSE_TOPIC`, each
response carrying the ``correlationData`` of its command and an ``error`` text when it
failed. Every subscriber of the response topic sees every response (2.0.x publishes them to
the topic, not to the sender), so correlation ids are random and unknown ones are ignored.

Per device (see :func:`device_acls`): a client whose username *and* client id are the
device id (the plugin refuses a connection whose client id differs), holding one role
``lepton-device-<id>`` that allows exactly its own topics; the broker's default ACL
access denies everything else (``lepton broker init`` writes it so).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from lepton.common.errors import LeptonError
from lepton.protocol import topics

CONTROL_TOPIC: Final = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC: Final = "$CONTROL/dynamic-security/v1/response"
ROLE_PREFIX: Final = "lepton-device-"

#: Errors that leave the account in the state a command asked for (idempotent calls), or
#: that answer a question (no such client).
TOLERATED: Final = frozenset(
    {
        ("getClient", "Client not found"),
        ("createRole", "Role already exists"),
        ("addRoleACL", "ACL with this topic already exists"),
        ("createClient", "Client already exists"),
        ("deleteClient", "Client not found"),
        ("deleteRole", "Role not found"),
    }
)


def role_name(device_id: str) -> str:
    """The role that carries one device's ACLs."""
    return ROLE_PREFIX + topics.validate_id(device_id)


def device_acls(fleet: str, device_id: str) -> list[dict[str, Any]]:
    """Publish under its own device topics; subscribe to and receive its own commands."""
    root = f"{topics.ROOT}/{topics.TOPIC_VERSION}/{topics.validate_id(fleet, what='fleet')}"
    dev = topics.validate_id(device_id)
    return [
        _acl("publishClientSend", f"{root}/device/{dev}/#"),
        _acl("subscribePattern", f"{root}/cmd/{dev}/#"),
        _acl("publishClientReceive", f"{root}/cmd/{dev}/#"),
    ]


def _acl(acltype: str, topic: str) -> dict[str, Any]:
    return {"acltype": acltype, "topic": topic, "allow": True, "priority": 0}


def provision_commands(fleet: str, device_id: str, password: str) -> list[dict[str, Any]]:
    """Create the role and the client, or bring existing ones to this state.

    ``createRole`` and ``createClient`` fail harmlessly when the account exists; the
    ``addRoleACL`` and ``modifyClient`` that follow then set its ACLs, client id, role and
    password. Mosquitto ends the session of a client whose password is modified, so a reset
    password takes effect at once.
    """
    if not isinstance(password, str) or not password:
        raise ValueError("a device password must be a non-empty string")
    role = role_name(device_id)
    acls = device_acls(fleet, device_id)
    client = {
        "username": device_id,
        "password": password,
        "clientid": device_id,
        "roles": [{"rolename": role}],
    }
    return [
        {"command": "createRole", "rolename": role, "acls": acls},
        *({"command": "addRoleACL", "rolename": role, **acl} for acl in acls),
        {"command": "createClient", **client},
        {"command": "modifyClient", **client},
    ]


def remove_commands(device_id: str) -> list[dict[str, Any]]:
    """Delete the client (the broker ends its session) and its role."""
    return [
        {"command": "deleteClient", "username": topics.validate_id(device_id)},
        {"command": "deleteRole", "rolename": role_name(device_id)},
    ]


def get_client_command(device_id: str) -> dict[str, Any]:
    """Ask for the account of this name (to check it is a device's before changing it)."""
    return {"command": "getClient", "username": topics.validate_id(device_id)}


def foreign_account(reply: Reply, device_id: str) -> str | None:
    """Why the account ``getClient`` described is not ``device_id``'s device account (an
    operator's or the coordinator's, which provision and remove must never touch), or None
    when there is no such account or it is the device's."""
    if reply.error is not None:
        return None  # "Client not found" (any other error was raised already)
    client = reply.data.get("client") if isinstance(reply.data, dict) else None
    if not isinstance(client, dict):
        return "the broker's getClient answer has no client"
    roles = client.get("roles")
    names = (
        [r.get("rolename") for r in roles if isinstance(r, dict)] if isinstance(roles, list) else []
    )
    groups = client.get("groups")
    if names not in ([], [role_name(device_id)]) or groups:
        return (
            f"an account named {device_id!r} exists with roles {names} and groups"
            f" {groups or []}: it is not a Lepton device account, so it is left alone"
        )
    return None


def probe_commands() -> list[dict[str, Any]]:
    """A read-only command every plugin version answers: is the plugin there and may we?"""
    return [{"command": "getDefaultACLAccess"}]


def encode(commands: Iterable[dict[str, Any]], request_id: str) -> bytes:
    """One control message; command ``i`` carries ``correlationData`` ``<request_id>:<i>``."""
    tagged = [{**c, "correlationData": f"{request_id}:{i}"} for i, c in enumerate(commands)]
    return json.dumps({"commands": tagged}, separators=(",", ":")).encode()


class BadResponseError(LeptonError, ValueError):
    """A message on the response topic is not the plugin's response shape."""


@dataclass(frozen=True, slots=True)
class Reply:
    """One command's answer: ``error`` is the plugin's text, None on success."""

    index: int
    command: str
    error: str | None
    data: Any = None

    @property
    def ok(self) -> bool:
        return self.error is None or (self.command, self.error) in TOLERATED


def decode(payload: bytes) -> dict[str, list[Reply]]:
    """Replies grouped by request id. Raises BadResponseError (with the reason) on a payload that
    is not the plugin's response shape; responses without our correlation form are skipped."""
    try:
        tree = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadResponseError(f"not JSON: {exc}") from exc
    responses = tree.get("responses") if isinstance(tree, dict) else None
    if not isinstance(responses, list):
        raise BadResponseError("no 'responses' list")
    out: dict[str, list[Reply]] = {}
    for item in responses:
        if not isinstance(item, dict):
            raise BadResponseError("a response is not an object")
        corr, command, error = item.get("correlationData"), item.get("command"), item.get("error")
        if not isinstance(corr, str) or ":" not in corr:
            continue  # someone else's request (or a whole message the plugin could not parse)
        request_id, _, index = corr.rpartition(":")
        if not index.isdigit() or not isinstance(command, str):
            raise BadResponseError(f"malformed response {item!r:.200}")
        if error is not None and not isinstance(error, str):
            raise BadResponseError(f"malformed error in {item!r:.200}")
        out.setdefault(request_id, []).append(Reply(int(index), command, error, item.get("data")))
    return out
