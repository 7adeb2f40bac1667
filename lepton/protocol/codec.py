"""MessagePack codec: the one place bytes become messages and messages become bytes.

Anything wrong with a payload (too large, nested too deeply, not MessagePack, wrong shape,
unknown type or version, a value out of range, a message of a type not expected on that
channel) raises :class:`~lepton.protocol.errors.DecodeError` with a stable ``reason`` token; nothing
else escapes.
"""

from __future__ import annotations

import re
from typing import Any, Final, TypeVar, overload

import msgspec

from lepton.protocol.errors import DecodeError
from lepton.protocol.messages import (
    MAX_ID_LENGTH,
    MESSAGE_TYPES,
    MSG_ID_PATTERN,
    SCHEMA_VERSION,
    Message,
)

MAX_MESSAGE_BYTES: Final = 256 * 1024
# Deepest nesting of arrays and maps a payload may have. The schema itself nests three levels;
# the rest is room for free-form ``params``/``output``. A fixed limit keeps the decoder's C
# recursion bounded whatever the interpreter's recursion limit or the thread's stack size is.
MAX_DEPTH: Final = 32

_encoder: Final = msgspec.msgpack.Encoder()
_decoder: Final = msgspec.msgpack.Decoder(Message)

_TAGS: Final = frozenset(cls.__struct_config__.tag for cls in MESSAGE_TYPES)
# Only an id that would pass as ``messages.MsgId`` is echoed into errors (and so into logs).
_ID_RE: Final = re.compile(MSG_ID_PATTERN)


class _Header(msgspec.Struct):
    """The part of any message we can read without knowing its type."""

    v: Any = None
    type: Any = None
    id: Any = None


_header_decoder: Final = msgspec.msgpack.Decoder(_Header)

M = TypeVar("M", bound=Message)
# What an MQTT client hands over; ``collections.abc.Buffer`` needs Python 3.12.
Payload = bytes | bytearray | memoryview


def encode(msg: Message) -> bytes:
    """Serialize a message. Raises ``ValueError`` if the result exceeds the size limit.

    The output is deterministic: the same message always gives the same bytes.
    """
    data = _encoder.encode(msg)
    if len(data) > MAX_MESSAGE_BYTES:
        raise ValueError(f"encoded message is {len(data)} bytes, limit {MAX_MESSAGE_BYTES}")
    return data


# How each MessagePack head byte is followed, as (kind, a, b):
#   _SKIP: ``a`` more bytes;             _SIZED: an ``a``-byte length, ``b`` more bytes, payload;
#   _ITEMS: a container of ``a`` items;  _COUNTED: an ``a``-byte count of items, times ``b``.
_SKIP, _SIZED, _ITEMS, _COUNTED, _INVALID = range(5)


def _head_table() -> tuple[tuple[int, int, int], ...]:
    table = [(_INVALID, 0, 0)] * 256
    for head in [*range(0x80), *range(0xE0, 0x100), 0xC0, 0xC2, 0xC3]:
        table[head] = (_SKIP, 0, 0)  # fixint, nil, bool
    for head in range(0x80, 0x90):
        table[head] = (_ITEMS, 2 * (head & 0x0F), 0)  # fixmap: keys and values
    for head in range(0x90, 0xA0):
        table[head] = (_ITEMS, head & 0x0F, 0)  # fixarray
    for head in range(0xA0, 0xC0):
        table[head] = (_SKIP, head & 0x1F, 0)  # fixstr
    fixed_sizes = (4, 8, 1, 2, 4, 8, 1, 2, 4, 8, 2, 3, 5, 9, 17)
    # float 32/64, uint 8..64, int 8..64, fixext 1..16 (type byte + data)
    for head, size in zip(range(0xCA, 0xD9), fixed_sizes, strict=True):
        table[head] = (_SKIP, size, 0)
    for first, extra in ((0xC4, 0), (0xC7, 1), (0xD9, 0)):  # bin, ext (+ type byte), str
        for i, width in enumerate((1, 2, 4)):
            table[first + i] = (_SIZED, width, extra)
    table[0xDC], table[0xDD] = (_COUNTED, 2, 1), (_COUNTED, 4, 1)  # array 16/32
    table[0xDE], table[0xDF] = (_COUNTED, 2, 2), (_COUNTED, 4, 2)  # map 16/32
    return tuple(table)


_HEADS: Final = _head_table()
# Every byte that cannot start an array or a map.
_NOT_CONTAINER_HEADS: Final = bytes(h for h in range(256) if _HEADS[h][0] not in (_ITEMS, _COUNTED))


def _too_deep(data: bytes, limit: int) -> bool:
    """True if the MessagePack value in ``data`` nests arrays/maps deeper than ``limit``.

    Malformed input is left for the real decoder to report, so this returns False on it.
    """
    # Every container starts with one of these bytes, so no more of them than ``limit``
    # cannot nest too deeply; that settles ordinary messages without walking them.
    if len(data.translate(None, _NOT_CONTAINER_HEADS)) <= limit:
        return False
    remaining: list[int] = []  # items left to read in each open container
    pos, end = 0, len(data)
    while pos < end:
        kind, a, b = _HEADS[data[pos]]
        pos += 1
        items = 0
        if kind == _SKIP:
            pos += a
        elif kind == _SIZED:
            pos += a + b + int.from_bytes(data[pos : pos + a], "big")
        elif kind == _ITEMS:
            items = a
        elif kind == _COUNTED:
            items = b * int.from_bytes(data[pos : pos + a], "big")
            pos += a
        else:
            return False
        if items:
            remaining.append(items)
            if len(remaining) > limit:
                return True
            continue
        # A complete value was read: close every container it completes.
        while remaining:
            remaining[-1] -= 1
            if remaining[-1]:
                break
            remaining.pop()
        if not remaining:
            return False  # the top-level value is complete; trailing bytes are the decoder's
    return False


def _header(data: bytes) -> _Header | None:
    try:
        return _header_decoder.decode(data)
    except (msgspec.DecodeError, RecursionError, ValueError):
        return None


def _safe_id(value: object) -> str | None:
    if isinstance(value, str) and len(value) <= MAX_ID_LENGTH and _ID_RE.search(value):
        return value
    return None


def _failure(data: bytes, exc: Exception) -> DecodeError:
    """Classify a payload the typed decoder refused, reading what it can of its header."""
    header = _header(data)
    if header is None:
        return DecodeError("malformed", str(exc))
    msg_id = _safe_id(header.id)
    v = header.v
    if isinstance(v, int) and not isinstance(v, bool) and v > SCHEMA_VERSION:
        return DecodeError(
            "unsupported_version",
            f"v={v}, this side speaks v<={SCHEMA_VERSION}",
            message_id=msg_id,
        )
    if header.type is not None and (not isinstance(header.type, str) or header.type not in _TAGS):
        return DecodeError("unknown_type", f"type={header.type!r:.80}", message_id=msg_id)
    return DecodeError("invalid", str(exc), message_id=msg_id)


@overload
def decode(data: Payload, expect: type[M], *, max_bytes: int = ...) -> M: ...
@overload
def decode(data: Payload, expect: None = None, *, max_bytes: int = ...) -> Message: ...


def decode(
    data: Payload, expect: type[M] | None = None, *, max_bytes: int = MAX_MESSAGE_BYTES
) -> Message:
    """Decode and validate one message.

    ``expect`` restricts the accepted type (the channel a message arrived on implies it).
    Fields this side does not know are ignored, so newer senders of the same schema version
    stay readable. Raises :class:`DecodeError` and nothing else for any bad payload.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError("not_bytes", type(data).__name__)
    size = memoryview(data).nbytes
    if size > max_bytes:
        raise DecodeError("oversized", f"{size} bytes > limit {max_bytes}")
    if size == 0:
        raise DecodeError("empty")
    raw = bytes(data)
    if _too_deep(raw, MAX_DEPTH):
        raise DecodeError("too_deep", f"arrays/maps nested deeper than {MAX_DEPTH}")
    try:
        msg = _decoder.decode(raw)
    except (msgspec.DecodeError, RecursionError, ValueError) as exc:
        raise _failure(raw, exc) from exc
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
