"""The wire contract's errors, with machine-readable fields, under the project's one root."""

from __future__ import annotations

from lepton.common.errors import LeptonError

__all__ = ["DecodeError", "TopicError"]


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
