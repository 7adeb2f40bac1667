"""MessagePack codec: the one place bytes become messages and messages become bytes.

Anything wrong with a payload (too large, not MessagePack, wrong shape, unknown type or
version, a value out of range, a message of a type not expected on that channel) raises
:class:`~protocol.errors.DecodeError` with a stable ``reason`` token; nothing else escapes.
"""

from __future__ import annotations

from typing import Any, Final, TypeVar, overload

import msgspec

from protocol.errors import DecodeError
from protocol.messages import SCHEMA_VERSION, Message

MAX_MESSAGE_BYTES: Final = 256 * 1024

_encoder: Final = msgspec.msgpack.Encoder()
_decoder: Final = msgspec.msgpack.Decoder(Message)


class _Header(msgspec.Struct):
    """The part of any message we can read without knowing its type."""

    v: Any = None
    type: Any = None
    id: Any = None


_header_decoder: Final = msgspec.msgpack.Decoder(_Header)

M = TypeVar("M", bound=Message)


def encode(msg: Message) -> bytes:
    """Serialize a message. Raises ``ValueError`` if the result exceeds the size limit."""
    data = _encoder.encode(msg)
    if len(data) > MAX_MESSAGE_BYTES:
        raise ValueError(f"encoded message is {len(data)} bytes, limit {MAX_MESSAGE_BYTES}")
    return data


def _header(data: bytes) -> _Header | None:
    try:
        return _header_decoder.decode(data)
    except (msgspec.DecodeError, RecursionError, ValueError):
        return None


@overload
def decode(data: bytes, expect: type[M], *, max_bytes: int = ...) -> M: ...
@overload
def decode(data: bytes, expect: None = None, *, max_bytes: int = ...) -> Message: ...


def decode(data: bytes, expect: type[M] | None = None, *, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """Decode and validate one message.

    ``expect`` restricts the accepted type (the channel a message arrived on implies it).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError("not_bytes", type(data).__name__)
    if len(data) > max_bytes:
        raise DecodeError("oversized", f"{len(data)} bytes > limit {max_bytes}")
    if len(data) == 0:
        raise DecodeError("empty")
    try:
        msg = _decoder.decode(data)
    except (msgspec.DecodeError, RecursionError, ValueError) as exc:
        header = _header(bytes(data))
        msg_id = header.id if header is not None and isinstance(header.id, str) else None
        if header is None:
            raise DecodeError("malformed", str(exc)) from exc
        if isinstance(header.v, int) and not isinstance(header.v, bool) and header.v > SCHEMA_VERSION:
            raise DecodeError(
                "unsupported_version", f"v={header.v}, this side speaks v<={SCHEMA_VERSION}",
                message_id=msg_id,
            ) from exc
        if "Invalid value" in str(exc) and "`$.type`" in str(exc):
            raise DecodeError("unknown_type", str(exc), message_id=msg_id) from exc
        raise DecodeError("invalid", str(exc), message_id=msg_id) from exc
    if msg.v != SCHEMA_VERSION:
        raise DecodeError(
            "unsupported_version",
            f"v={msg.v}, this side speaks v={SCHEMA_VERSION}",
            message_id=msg.id,
        )
    if expect is not None and not isinstance(msg, expect):
        raise DecodeError(
            "unexpected_type",
            f"got {type(msg).__name__}, expected {expect.__name__}",
            message_id=msg.id,
        )
    return msg
