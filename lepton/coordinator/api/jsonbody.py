"""What a JSON request body must be before FastAPI and pydantic see it.

Standard JSON (RFC 8259: no ``NaN`` or ``Infinity``, no number too large for a float) nested
no deeper than the wire codec allows (:data:`lepton.protocol.codec.MAX_DEPTH`), so a body the API
accepts can always travel in a message, and a hostile one is refused with its reason instead
of exhausting the interpreter's recursion limit somewhere further in.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Final

from lepton.protocol import codec

#: Deepest nesting of arrays and objects in a body: the codec's, so both sides share one
#: definition (the body's top level is the message's, so ``params`` gets one level less).
MAX_DEPTH: Final = codec.MAX_DEPTH


@dataclass(frozen=True, slots=True)
class BodyProblem:
    """Why a body is refused: an HTTP status, a stable reason token and a sentence."""

    status: int
    reason: str
    detail: str


class _NotFiniteError(ValueError):
    pass


def _refuse_constant(name: str) -> Any:
    raise _NotFiniteError(f"{name} is not a JSON number")


def check_json(body: bytes, max_depth: int = MAX_DEPTH) -> BodyProblem | None:
    """None when ``body`` is empty, or JSON within the limits; else what is wrong with it.

    Syntax errors are left to FastAPI (it answers 422 with the position), so a client sees
    the same error for a malformed body as before.
    """
    if not body:
        return None
    try:
        value = json.loads(body, parse_constant=_refuse_constant)
    except _NotFiniteError as exc:
        return BodyProblem(422, "not_finite", f"{exc}; numbers must be finite")
    except RecursionError:
        return _too_deep(max_depth)
    except ValueError:  # not JSON, not UTF-8: FastAPI reports where
        return None
    return _value_problem(value, body, max_depth)


def _value_problem(value: Any, body: bytes, max_depth: int) -> BodyProblem | None:
    # Cheap bound first: every array or object opens with one of these two bytes.
    shallow = body.count(b"[") + body.count(b"{") <= max_depth
    if not shallow and _deeper_than(value, max_depth):
        return _too_deep(max_depth)
    if _has_non_finite(value):
        return BodyProblem(422, "not_finite", "a number is out of range; numbers must be finite")
    return None


def _too_deep(max_depth: int) -> BodyProblem:
    return BodyProblem(400, "too_deep", f"arrays/objects nested deeper than {max_depth}")


def _deeper_than(value: Any, limit: int) -> bool:
    # Iterative: the point is not to recurse on what a client sent.
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _has_non_finite(value: Any) -> bool:
    # ``1e400`` parses as inf without passing through ``parse_constant``.
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float):
            if not math.isfinite(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False
