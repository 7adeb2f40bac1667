"""Hypothesis strategies derived from the msgspec schema itself.

Walking ``msgspec.inspect`` type info (rather than hand-writing one strategy per message)
keeps every ``Meta`` constraint (lengths, patterns, bounds) honoured, and a field added to a
message is covered without touching the tests.
"""

from __future__ import annotations

import functools
from typing import Any

import msgspec
import msgspec.inspect as mi
from hypothesis import strategies as st

from lepton.protocol.messages import MESSAGE_TYPES, Message

# Collections are capped well below their schema limits so examples stay fast; the limits
# themselves are tested separately.
MAX_COLLECTION = 6

_INT64_MIN = -(2**63)
_UINT64_MAX = 2**64 - 1


@functools.cache
def any_values(*, allow_nan: bool = False, max_leaves: int = 10) -> st.SearchStrategy[Any]:
    """Free-form values as MessagePack carries them and msgspec gives them back for ``Any``."""
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=_INT64_MIN, max_value=_UINT64_MAX),
        st.floats(allow_nan=allow_nan),
        st.text(max_size=16),
        st.binary(max_size=16),
    )
    return st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4),
            st.dictionaries(st.text(max_size=8), inner, max_size=4),
        ),
        max_leaves=max_leaves,
    )


def _int(t: mi.IntType) -> st.SearchStrategy[int]:
    lo = t.ge if t.ge is not None else (t.gt + 1 if t.gt is not None else _INT64_MIN)
    hi = t.le if t.le is not None else (t.lt - 1 if t.lt is not None else _UINT64_MAX)
    return st.integers(min_value=lo, max_value=hi)


def _float(t: mi.FloatType) -> st.SearchStrategy[float]:
    lo = t.ge if t.ge is not None else t.gt
    hi = t.le if t.le is not None else t.lt
    return st.floats(
        min_value=lo,
        max_value=hi,
        exclude_min=t.gt is not None,
        exclude_max=t.lt is not None,
        allow_nan=False,
        allow_infinity=False,
    )


def _str(t: mi.StrType) -> st.SearchStrategy[str]:
    lo, hi = t.min_length or 0, t.max_length if t.max_length is not None else 64
    if t.pattern is None:
        return st.text(min_size=lo, max_size=min(hi, 80))
    return st.from_regex(t.pattern, fullmatch=True).filter(lambda s: lo <= len(s) <= hi)


def _sized(t: mi.ListType | mi.DictType) -> tuple[int, int]:
    lo = t.min_length or 0
    hi = t.max_length if t.max_length is not None else MAX_COLLECTION
    return lo, max(lo, min(hi, MAX_COLLECTION))


def from_type(t: mi.Type) -> st.SearchStrategy[Any]:
    """A strategy for values of msgspec type ``t`` that pass its validation."""
    if isinstance(t, mi.AnyType):
        return any_values()
    if isinstance(t, mi.NoneType):
        return st.none()
    if isinstance(t, mi.BoolType):
        return st.booleans()
    if isinstance(t, mi.IntType):
        return _int(t)
    if isinstance(t, mi.FloatType):
        return _float(t)
    if isinstance(t, mi.StrType):
        return _str(t)
    if isinstance(t, mi.LiteralType):
        return st.sampled_from(t.values)
    if isinstance(t, mi.ListType):
        lo, hi = _sized(t)
        return st.lists(from_type(t.item_type), min_size=lo, max_size=hi)
    if isinstance(t, mi.DictType):
        lo, hi = _sized(t)
        keys, values = from_type(t.key_type), from_type(t.value_type)
        return st.dictionaries(keys, values, min_size=lo, max_size=hi)
    if isinstance(t, mi.UnionType):
        return st.one_of(*(from_type(member) for member in t.types))
    if isinstance(t, mi.StructType):
        return structs(t.cls)
    raise NotImplementedError(f"no strategy for {t!r}; extend tests/protocol/strategies.py")


@functools.cache
def structs(cls: type[msgspec.Struct]) -> st.SearchStrategy[Any]:
    """Instances of ``cls``: required fields always drawn, optional ones drawn or defaulted."""
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    required = {f.name: from_type(f.type) for f in info.fields if f.required}
    # ``v`` admits later versions in the schema, but this side only accepts its own.
    optional = {f.name: from_type(f.type) for f in info.fields if not f.required and f.name != "v"}
    return st.fixed_dictionaries(required, optional=optional).map(lambda kw: cls(**kw))


def messages(cls: type[Message] | None = None) -> st.SearchStrategy[Message]:
    """Valid messages of one type, or of any type when ``cls`` is None."""
    if cls is not None:
        return structs(cls)
    return st.one_of(*(structs(c) for c in MESSAGE_TYPES))
