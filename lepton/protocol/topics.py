"""MQTT topic scheme, built and parsed in one place.

``lepton/v1/{fleet}/device/{device_id}/{channel}`` carries device -> cloud traffic and
``lepton/v1/{fleet}/cmd/{device_id}/{channel}`` carries cloud -> device traffic. A device's
broker ACL lets it publish only under its own id, so the topic (not the payload) is the
authority on who sent a message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal

from lepton.protocol.errors import TopicError

ROOT: Final = "lepton"
TOPIC_VERSION: Final = "v1"
MAX_ID_LENGTH: Final = 64

# Letters, digits, dot, dash, underscore, colon. This excludes the MQTT wildcards (+ #), the level
# separator (/), NUL, whitespace and the "$" that introduces broker-internal topics.
_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")

Direction = Literal["device", "cmd"]

# Device -> cloud.
STATE: Final = "state"
CAPACITY: Final = "capacity"
RESULT: Final = "result"
TASK_ACK: Final = "task-ack"
# Cloud -> device.
TASK: Final = "task"
RESULT_ACK: Final = "result-ack"
CANCEL: Final = "cancel"

DEVICE_CHANNELS: Final = frozenset({STATE, CAPACITY, RESULT, TASK_ACK, "chunk-req", "update"})
CMD_CHANNELS: Final = frozenset({TASK, RESULT_ACK, CANCEL, "config"})


def validate_id(value: str, *, what: str = "device id") -> str:
    """Return ``value`` if it is a safe topic level, else raise :class:`TopicError`."""
    if not isinstance(value, str):
        raise TopicError(f"{what} must be a string")
    if not value or len(value) > MAX_ID_LENGTH:
        raise TopicError(f"{what} must be 1..{MAX_ID_LENGTH} characters", value)
    if _ID_RE.fullmatch(value) is None:
        raise TopicError(
            f"{what} may hold only letters, digits and . _ : - (no wildcards, '/', NUL)", value
        )
    return value


def device_topic(fleet: str, device_id: str, channel: str) -> str:
    """Topic a device publishes ``channel`` on."""
    if channel not in DEVICE_CHANNELS:
        raise TopicError("unknown device channel", channel)
    fleet_id = validate_id(fleet, what="fleet")
    return f"{ROOT}/{TOPIC_VERSION}/{fleet_id}/device/{validate_id(device_id)}/{channel}"


def cmd_topic(fleet: str, device_id: str, channel: str) -> str:
    """Topic the cloud publishes ``channel`` on for one device."""
    if channel not in CMD_CHANNELS:
        raise TopicError("unknown command channel", channel)
    fleet_id = validate_id(fleet, what="fleet")
    return f"{ROOT}/{TOPIC_VERSION}/{fleet_id}/cmd/{validate_id(device_id)}/{channel}"


def device_filter(fleet: str, channel: str = "+", device_id: str = "+") -> str:
    """Subscription filter for device -> cloud traffic (wildcards allowed)."""
    fleet_id = validate_id(fleet, what="fleet")
    if device_id != "+":
        validate_id(device_id)
    if channel not in ("+", "#") and channel not in DEVICE_CHANNELS:
        raise TopicError("unknown device channel", channel)
    return f"{ROOT}/{TOPIC_VERSION}/{fleet_id}/device/{device_id}/{channel}"


def cmd_filter(fleet: str, device_id: str) -> str:
    """Subscription filter for everything the cloud sends one device."""
    fleet_id = validate_id(fleet, what="fleet")
    return f"{ROOT}/{TOPIC_VERSION}/{fleet_id}/cmd/{validate_id(device_id)}/+"


@dataclass(frozen=True, slots=True, kw_only=True)
class Topic:
    """A parsed Lepton topic."""

    fleet: str
    direction: Direction
    device_id: str
    channel: str


def parse(topic: str) -> Topic:
    """Parse a concrete topic; raise :class:`TopicError` for anything not in the scheme."""
    if not isinstance(topic, str):
        raise TopicError("topic must be a string")
    parts = topic.split("/")
    if len(parts) != 6 or parts[0] != ROOT:
        raise TopicError("not a lepton topic", topic)
    _, version, fleet, direction, device_id, channel = parts
    if version != TOPIC_VERSION:
        raise TopicError("unsupported topic version", topic)
    validate_id(fleet, what="fleet")
    validate_id(device_id)
    if direction == "device":
        if channel not in DEVICE_CHANNELS:
            raise TopicError("unknown device channel", topic)
        return Topic(fleet=fleet, direction="device", device_id=device_id, channel=channel)
    if direction == "cmd":
        if channel not in CMD_CHANNELS:
            raise TopicError("unknown command channel", topic)
        return Topic(fleet=fleet, direction="cmd", device_id=device_id, channel=channel)
    raise TopicError("unknown topic direction", topic)
