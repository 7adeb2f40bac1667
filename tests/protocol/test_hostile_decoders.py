"""Every decoder of the wire contract against hostile input: random bytes, truncated and
mutated valid encodings, deep nesting, oversized input and wrongly typed values. Each may
refuse only with its documented error (nothing else escapes, nothing hangs), whatever it is
given. ``EXAMPLES`` inputs per decoder and kind of attack; docs/security.md states the totals.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Final

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lepton.protocol import codec, enrolment, tasks, topics, weights
from lepton.protocol.errors import DecodeError, TopicError
from lepton.protocol.imports import Allowlist, ImportPathError, resolve
from lepton.protocol.messages import Task
from tests.protocol.strategies import any_values

EXAMPLES: Final = 300
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
MAX_WEIGHTS = 1 << 20


def _weights_blob() -> bytes:
    state = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.zeros(3, np.float32)}
    return weights.encode_weights(state, kind="weights")


def _enrol_answer() -> bytes:
    mqtt = enrolment.MqttAccount(host="h", port=8883, tls=True, username="d", password="p")
    answer = enrolment.EnrollResponse(
        device_id="d", fleet="f", http_token="lpd_x", coordinator_url="https://c", mqtt=mqtt
    )
    return msgspec.json.encode(answer)


def _weights(data: bytes) -> object:
    return weights.decode_weights(data, max_bytes=MAX_WEIGHTS)


# name -> (decode bytes, a valid encoding, the errors it may raise)
BYTE_DECODERS: Final[dict[str, tuple[Callable[[bytes], object], bytes, tuple[type, ...]]]] = {
    "codec.decode (MQTT messages)": (
        codec.decode,
        codec.encode(Task(task_id="t", kind="echo", params={"payload": "x"}, expires_at=2e9)),
        (DecodeError,),
    ),
    "weights.decode_weights (global weights, updates)": (
        _weights,
        _weights_blob(),
        (DecodeError,),
    ),
    "enrolment.decode_response (agent side of enrolment)": (
        enrolment.decode_response,
        _enrol_answer(),
        (DecodeError,),
    ),
}


def _nested(depth: int, leaf: Any = 0) -> Any:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def hostile_bytes(valid: bytes) -> st.SearchStrategy[bytes]:
    """Random bytes, truncations and single-byte mutations of ``valid``, deep nesting in
    MessagePack and JSON, and input far above any limit."""
    cut = st.integers(0, max(0, len(valid) - 1)).map(lambda n: valid[:n])
    flip = st.tuples(st.integers(0, len(valid) - 1), st.integers(0, 255)).map(
        lambda p: valid[: p[0]] + bytes([p[1]]) + valid[p[0] + 1 :]
    )
    deep = st.integers(100, 5000).flatmap(
        lambda d: st.sampled_from(
            # MessagePack one-element arrays (0x91) d deep; JSON arrays and objects d deep.
            [b"\x91" * d + b"\x00", b"[" * d + b"]" * d, b'{"a":' * d + b"1"]
        )
    )
    typed = any_values(allow_nan=True).map(msgspec.msgpack.encode)
    typed_json = any_values().flatmap(
        lambda v: st.just(msgspec.json.encode(v)) if _jsonable(v) else st.just(b"{}")
    )
    huge = st.sampled_from([b"\x00" * (MAX_WEIGHTS + 1), valid * 4000])
    return st.one_of(st.binary(max_size=512), cut, flip, deep, typed, typed_json, huge)


def _jsonable(v: Any) -> bool:
    try:
        msgspec.json.encode(v)
    except (TypeError, ValueError):
        return False
    return True


@pytest.mark.parametrize("name", list(BYTE_DECODERS))
def test_byte_decoders_refuse_only_with_their_error(name: str) -> None:
    decode, valid, allowed = BYTE_DECODERS[name]
    decode(valid)  # the sample is valid: the attacks below start from real input

    @FUZZ
    @given(hostile_bytes(valid))
    def attack(data: bytes) -> None:
        with contextlib.suppress(*allowed):
            decode(data)

    attack()


def hostile_mappings() -> st.SearchStrategy[dict[str, Any]]:
    deep = st.integers(50, 2000).map(lambda d: {"payload": _nested(d), "digest": _nested(d)})
    long = st.sampled_from([{"name": "x" * 100_000}, {"digest": "a" * 1_000_000}])
    typed = st.dictionaries(st.text(max_size=12), any_values(allow_nan=True), max_size=8)
    return st.one_of(typed, deep, long)


@pytest.mark.parametrize("kind", tasks.TASK_KINDS)
def test_task_contracts_refuse_only_with_validation_errors(kind: str) -> None:
    @FUZZ
    @given(hostile_mappings(), st.booleans())
    def attack(value: dict[str, Any], output: bool) -> None:
        with contextlib.suppress(msgspec.ValidationError, ValueError):
            (tasks.decode_output if output else tasks.decode_params)(kind, value)

    attack()


@FUZZ
@given(st.one_of(st.text(max_size=300), st.binary(max_size=64).map(repr), st.just("a/" * 5000)))
def test_topics_refuse_only_with_topic_errors(topic: str) -> None:
    with contextlib.suppress(TopicError):
        topics.parse(topic)


@FUZZ
@given(st.text(max_size=300))
def test_import_paths_are_refused_before_anything_is_imported(path: str) -> None:
    """Whatever a job names, only allowlisted modules can be imported (nothing here matches
    the allowlist, so every path must be refused, and by the check, not by an import)."""
    allow = Allowlist(("lepton.models.*",))
    if path.startswith(("lepton.models.", "lepton.models:")):
        return
    with pytest.raises(ImportPathError):
        resolve(path, allow=allow)


def test_enrolment_requests_refuse_unknown_fields_and_bad_ids() -> None:
    """The coordinator decodes enrolment bodies with this struct: unknown fields, ids that
    are not ids and oversized CSRs are refused before anything is done."""
    bad = [
        {"device_id": "d", "extra": 1},
        {"device_id": "../etc"},
        {"device_id": "x" * 65},
        {"device_id": "d", "csr_pem": "x" * (enrolment.MAX_PEM_CHARS + 1)},
        {"device_id": 7},
    ]
    for body in bad:
        with pytest.raises(msgspec.ValidationError):
            msgspec.json.decode(msgspec.json.encode(body), type=enrolment.EnrollRequest)
