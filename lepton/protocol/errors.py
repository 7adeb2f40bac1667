"""One error root for the project, with a few typed subclasses carrying machine-readable fields."""

from __future__ import annotations


class LeptonError(Exception):
    """Root of every error Lepton raises on purpose."""


class DecodeError(LeptonError):
    """A payload could not be turned into a valid message.

    ``reason`` is a short, stable, machine-readable token (used as a metric label), and
    ``detail`` is the human-readable explanation. ``message_id`` is set when the payload was
    readable enough to carry one.
    """

    def __init__(self, reason: str, detail: str = "", *, message_id: str | None = None) -> None:
        self.reason = reason
        self.detail = detail
        self.message_id = message_id
        super().__init__(f"{reason}: {detail}" if detail else reason)


class TopicError(LeptonError):
    """A topic or an identifier used in a topic is malformed."""

    def __init__(self, reason: str, topic: str = "") -> None:
        self.reason = reason
        self.topic = topic
        super().__init__(f"{reason}: {topic!r}" if topic else reason)


class ConfigError(LeptonError):
    """Configuration is invalid; ``key`` names the offending setting when there is one."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        self.key = key
        super().__init__(message)
