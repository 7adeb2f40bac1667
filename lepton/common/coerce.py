"""The one conversion every settings layer goes through (:func:`coerce`): a value from a
file (typed already) or a string from the environment or a flag, to the declared type, with
msgspec checking the type and its ``Meta`` bounds and a refusal worded for a config file."""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Final, Literal, get_args, get_origin

import msgspec

from lepton.common.errors import ConfigError

_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off", ""})
_NONE: Final = frozenset({"", "none"})


def strip_optional(hint: Any) -> tuple[Any, bool]:
    """``T | None`` -> (T, True); anything else -> (it, False)."""
    if get_origin(hint) in (types.UnionType, typing.Union):
        args = [a for a in get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(args) < len(get_args(hint)):
            return args[0], True
    return hint, False


_KINDS: Final = {
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "bool": "true or false",
    "array": "a list",
    "object": "a table",
    "null": "nothing",
}


def _humane(message: str) -> str:
    """msgspec's "Expected `int` >= 1, got `str` - at `$[0]`" in the words of a config file."""
    message, _, where = message.partition(" - at `$")
    message = re.sub(r"Expected `(\w+)`", lambda m: "must be " + _KINDS.get(m[1], m[1]), message)
    message = re.sub(r", got `\w+`", "", message)
    if where.rstrip("`"):
        message += f" (item {where.rstrip('`')})"
    return message


def _from_text(base: Any, text: str) -> Any:
    """A string from the environment or a flag, parsed toward ``base`` (msgspec checks it)."""
    value = text.strip()
    if base is bool:
        if value.lower() in _TRUE:
            return True
        if value.lower() in _FALSE:
            return False
        raise ValueError("must be true or false")
    if base is int:
        return int(value)
    if base is float:
        return float(value)
    if get_origin(base) is tuple:
        items = [v.strip() for v in value.split(",") if v.strip()]
        item = get_args(base)[0] if get_args(base) else str
        return [_from_text(item, v) if item in (int, float) else v for v in items]
    return text


def unwrap(hint: Any) -> tuple[Any, tuple[Any, ...], bool]:
    """``Annotated[T | None, Meta(..)]`` or ``Annotated[T, ..] | None`` -> T, metas, optional."""
    metas: tuple[Any, ...] = ()
    if get_origin(hint) is Annotated:
        hint, *rest = get_args(hint)
        metas = tuple(rest)
    hint, optional = strip_optional(hint)
    if get_origin(hint) is Annotated:
        hint, *rest = get_args(hint)
        metas += tuple(rest)
    return hint, metas, optional


def _literal(inner: Any, value: Any) -> Any:
    choices = get_args(inner)
    if isinstance(value, int | float) and not isinstance(value, bool) and str(value) in choices:
        value = str(value)  # protocol = 5 for "5"
    if value not in choices:
        raise ValueError("must be one of " + ", ".join(str(c) for c in choices))
    return value


def _convert(hint: Any, value: Any, text: bool) -> Any:
    inner, metas, optional = unwrap(hint)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in _NONE):
        if optional:
            return None
        raise ValueError("must be set")
    if inner is Any:
        return value
    if get_origin(inner) is Literal:
        return _literal(inner, value)
    if inner is Path:
        if isinstance(value, Path):
            return value
        return Path(msgspec.convert(value, Annotated[(str, *metas)] if metas else str))
    if text and isinstance(value, str) and inner is not str:
        try:
            value = _from_text(inner, value)
        except ValueError as exc:
            if str(exc).startswith(("invalid literal", "could not convert")):
                raise ValueError(
                    "must be " + _KINDS.get(getattr(inner, "__name__", ""), str(inner))
                ) from None
            raise
    try:
        return msgspec.convert(value, Annotated[(inner, *metas)] if metas else inner)
    except msgspec.ValidationError:
        described = [m.description for m in metas if getattr(m, "description", None)]
        if described:
            raise ValueError(f"must be {described[0]}") from None
        raise


def coerce(key: str, hint: Any, value: Any, source: str = "", *, text: bool = True) -> Any:
    """``value`` as the declared type ``hint``, or a :class:`ConfigError` naming the key.

    The one conversion every layer goes through. With ``text`` (the environment and flags
    give only strings), a string is parsed first when the type is not a string; a file's
    values are typed already (``text=False``). msgspec then checks the type and any ``Meta``
    bounds on it (a ``Meta`` with a ``description`` explains a refusal in its words).
    """
    try:
        return _convert(hint, value, text)
    except (ValueError, TypeError, msgspec.ValidationError) as exc:
        origin = f", from {source}" if source else ""
        raise ConfigError(
            f"{key}: {_humane(str(exc))} (got {value!r}{origin})", key=key, source=source or None
        ) from None
