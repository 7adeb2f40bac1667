from __future__ import annotations

import itertools
import math
import subprocess
import sys
import textwrap
from typing import Any

import msgspec
import msgspec.inspect as mi
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lepton.common.errors import LeptonError
from lepton.protocol import codec
from lepton.protocol.codec import MAX_DEPTH, MAX_MESSAGE_BYTES, decode, encode
from lepton.protocol.errors import DecodeError
from lepton.protocol.messages import (
    MAX_BENCH_GOPS,
    MESSAGE_TYPES,
    SCHEMA_VERSION,
    Bench,
    CapacityReport,
    Cpu,
    Memory,
    Message,
    Result,
    ResultAck,
    Slots,
    State,
    Task,
    TaskAck,
    TaskCancel,
)
from tests.protocol.strategies import any_values, messages

REASONS = {
    "not_bytes",
    "oversized",
    "empty",
    "too_deep",
    "malformed",
    "unsupported_version",
    "unknown_type",
    "invalid",
    "unexpected_type",
}

EXAMPLES: dict[type[Message], Message] = {
    State: State(id="s-1", ts=1.0, state="online", runtimes=["onnx"], started_at=0.5),
    CapacityReport: CapacityReport(
        id="c-1",
        ts=2.0,
        cpu=Cpu(count=4, freq_mhz=[1500.0]),
        memory=Memory(total=8 << 30, available=1 << 30),
        slots=Slots(total=2),
        bench=Bench(fp32_gflops=3.5, measured_at=1.5),
        counters={"decode_errors": 3},
    ),
    TaskAck: TaskAck(id="a-1", ts=3.0, task_id="t-1", accepted=False, reason="busy"),
    Result: Result(id="r-1", ts=4.0, task_id="t-1", status="succeeded", output={"y": [1, 2]}),
    Task: Task(id="t-1", ts=5.0, task_id="t-1", kind="infer", params={"k": 1}, expires_at=9.0),
    ResultAck: ResultAck(id="ra-1", ts=6.0, ids=["r-1", "r-2"]),
    TaskCancel: TaskCancel(id="x-1", ts=7.0, task_ids=["t-1", "t-2"], reason="round_closed"),
}
WIRES = [encode(msg) for msg in EXAMPLES.values()]
TYPES = pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda c: c.__name__)


def as_dict(msg: Message) -> dict[str, Any]:
    """The message as the plain map that goes on the wire."""
    out: dict[str, Any] = msgspec.msgpack.decode(encode(msg))
    return out


def pack(obj: object) -> bytes:
    return msgspec.msgpack.encode(obj)


def refusal(data: Any, **kwargs: Any) -> DecodeError:
    """Decode ``data``, which must fail, and return the error after checking its shape."""
    with pytest.raises(DecodeError) as info:
        decode(data, **kwargs)
    err = info.value
    assert err.reason in REASONS
    return err


def decodes_or_refuses(data: bytes) -> Message | None:
    """Decode arbitrary bytes: a valid message or a DecodeError, never anything else."""
    err: DecodeError | None = None
    try:
        msg = decode(data)
    except DecodeError as exc:
        err = exc
    if err is not None:
        assert err.reason in REASONS
        assert err.message_id is None or isinstance(err.message_id, str)
        return None
    assert isinstance(msg, MESSAGE_TYPES)
    assert msg.v == SCHEMA_VERSION
    # Whatever decodes is itself a valid message again (compared on the wire: a NaN in a
    # free-form map is not equal to itself).
    wire = encode(msg)
    assert encode(decode(wire)) == wire
    return msg


# ---------------------------------------------------------------- round trips


@TYPES
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_message_type_round_trips(cls: type[Message], data: st.DataObject) -> None:
    msg = data.draw(messages(cls))
    wire = encode(msg)
    back = decode(wire)
    assert type(back) is cls
    assert back == msg
    assert decode(wire, cls) == msg
    assert decode(bytearray(wire)) == msg
    assert decode(memoryview(wire)) == msg


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msg=messages())
def test_encoding_is_stable(msg: Message) -> None:
    wire = encode(msg)
    assert encode(msg) == wire
    assert encode(decode(wire)) == wire


@settings(max_examples=30, deadline=None)
@given(params=st.dictionaries(st.text(max_size=8), any_values(allow_nan=True), max_size=6))
def test_encoding_is_stable_with_nan_in_free_form_params(params: dict[str, Any]) -> None:
    msg = Task(id="t", ts=1.0, task_id="t", kind="k", params=params, expires_at=2.0)
    wire = encode(msg)
    assert encode(decode(wire)) == wire


@TYPES
def test_examples_round_trip_and_carry_the_header(cls: type[Message]) -> None:
    msg = EXAMPLES[cls]
    wire = as_dict(msg)
    assert wire["v"] == SCHEMA_VERSION
    assert wire["type"] == cls.__struct_config__.tag
    assert wire["id"] == msg.id
    assert decode(encode(msg)) == msg


def test_decoded_messages_are_frozen() -> None:
    msg = decode(encode(EXAMPLES[Task]))
    with pytest.raises(AttributeError):
        msg.id = "other"  # type: ignore[misc]


def test_defaults_give_a_fresh_id_and_time() -> None:
    a = TaskAck(task_id="t", accepted=True)
    b = TaskAck(task_id="t", accepted=True)
    assert a.id != b.id
    assert a.ts > 0
    assert decode(encode(a)) == a


# ---------------------------------------------------------------- hostile bytes


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_raise_only_decode_error(data: bytes) -> None:
    decodes_or_refuses(data)


@st.composite
def mutated_encodings(draw: st.DrawFn) -> bytes:
    """A valid encoding damaged by a few random bit flips, cuts, insertions and splices."""
    data = bytearray(draw(st.sampled_from(WIRES)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "splice", "set"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif op == "splice":
            other = draw(st.sampled_from(WIRES))
            data[at:] = other[draw(st.integers(0, len(other))) :]
        elif op == "set" and data:
            data[at] = draw(st.integers(0, 255))
    return bytes(data)


@settings(max_examples=200, deadline=None)
@given(mutated_encodings())
def test_mutated_encodings_raise_only_decode_error(data: bytes) -> None:
    decodes_or_refuses(data)


@settings(max_examples=100, deadline=None)
@given(msg=st.sampled_from(list(EXAMPLES.values())), data=st.data())
def test_any_field_replaced_by_any_value_raises_only_decode_error(
    msg: Message, data: st.DataObject
) -> None:
    wire = as_dict(msg)
    key = data.draw(st.sampled_from(sorted(wire)))
    if data.draw(st.booleans()):
        wire[key] = data.draw(any_values(allow_nan=True))
    else:
        del wire[key]
    decodes_or_refuses(pack(wire))


def test_top_level_must_be_a_map() -> None:
    for value in ([1, 2], 7, "task", None, b"bytes", [as_dict(EXAMPLES[Task])]):
        assert refusal(pack(value)).reason == "malformed"


def test_trailing_bytes_are_refused() -> None:
    wire = encode(EXAMPLES[Task])
    assert refusal(wire + b"\xc0").reason == "malformed"
    assert refusal(wire + wire).reason == "malformed"


@pytest.mark.parametrize("value", ["text", None, 42, [b"x"], {"a": 1}])
def test_non_bytes_input_is_refused(value: object) -> None:
    assert refusal(value).reason == "not_bytes"


def test_empty_payload_is_refused() -> None:
    assert refusal(b"").reason == "empty"
    assert refusal(memoryview(b"")).reason == "empty"


# ---------------------------------------------------------------- size limit


def test_oversized_garbage_is_refused_before_decoding() -> None:
    # Not MessagePack at all (0xc1 is never valid): only a size check can say "oversized".
    assert refusal(b"\xc1" * (MAX_MESSAGE_BYTES + 1)).reason == "oversized"
    assert refusal(b"\xc1" * 11, max_bytes=10).reason == "oversized"


def test_oversized_deep_payload_is_refused_as_oversized() -> None:
    assert refusal(b"\x91" * (MAX_MESSAGE_BYTES + 1)).reason == "oversized"


def test_size_limit_is_inclusive_and_per_call() -> None:
    wire = encode(EXAMPLES[CapacityReport])
    assert decode(wire, max_bytes=len(wire)) == EXAMPLES[CapacityReport]
    err = refusal(wire, max_bytes=len(wire) - 1)
    assert err.reason == "oversized"
    assert str(len(wire)) in err.detail


def test_size_limit_counts_bytes_of_a_memoryview() -> None:
    wire = encode(EXAMPLES[Task])
    padded = wire + b"\0" * (8 + -len(wire) % 8)
    words = memoryview(padded).cast("Q")
    assert len(words) < len(wire) < len(padded)
    assert refusal(words, max_bytes=len(wire)).reason == "oversized"


def test_encode_refuses_a_message_over_the_limit() -> None:
    big = Task(task_id="t", kind="k", params={"blob": b"x" * MAX_MESSAGE_BYTES}, expires_at=1.0)
    with pytest.raises(ValueError, match="limit"):
        encode(big)


# ---------------------------------------------------------------- version and type


@TYPES
@pytest.mark.parametrize("v", [2, SCHEMA_VERSION + 1, 999, 1_000, 1_001, 10**6, 2**64 - 1])
def test_newer_version_is_unsupported(cls: type[Message], v: int) -> None:
    wire = as_dict(EXAMPLES[cls])
    wire["v"] = v
    err = refusal(pack(wire))
    assert err.reason == "unsupported_version"
    assert err.message_id == EXAMPLES[cls].id


@TYPES
def test_newer_version_wins_over_unknown_fields_and_types(cls: type[Message]) -> None:
    # A v2 message may look nothing like v1; it must still be reported as a version issue.
    wire = {"v": 2, "type": "v2-only", "id": "x-1", "whatever": [1, 2]}
    err = refusal(pack(wire), expect=cls)
    assert err.reason == "unsupported_version"
    assert err.message_id == "x-1"


@pytest.mark.parametrize("v", [0, -1, True, 1.0, "1", None, [1]])
def test_malformed_version_is_invalid(v: object) -> None:
    wire = as_dict(EXAMPLES[Task])
    wire["v"] = v
    assert refusal(pack(wire)).reason == "invalid"


@pytest.mark.parametrize("tag", ["bogus", "", "Task", "TASK", "task ", 3, 1.5, True, [], {}])
def test_unknown_type_tag(tag: object) -> None:
    wire = as_dict(EXAMPLES[Task])
    wire["type"] = tag
    err = refusal(pack(wire))
    assert err.reason == "unknown_type"
    assert err.message_id == EXAMPLES[Task].id


def test_missing_type_tag_is_invalid() -> None:
    wire = as_dict(EXAMPLES[Task])
    del wire["type"]
    assert refusal(pack(wire)).reason == "invalid"


@pytest.mark.parametrize(
    ("sent", "expected"),
    [(a, b) for a, b in itertools.product(MESSAGE_TYPES, repeat=2) if a is not b],
    ids=lambda c: c.__name__,
)
def test_expect_refuses_other_types(sent: type[Message], expected: type[Message]) -> None:
    err = refusal(encode(EXAMPLES[sent]), expect=expected)
    assert err.reason == "unexpected_type"
    assert err.message_id == EXAMPLES[sent].id
    assert sent.__name__ in err.detail
    assert expected.__name__ in err.detail


@TYPES
def test_expect_accepts_its_own_type(cls: type[Message]) -> None:
    assert decode(encode(EXAMPLES[cls]), cls) == EXAMPLES[cls]


# ---------------------------------------------------------------- forward compatibility


def _field_names(cls: type[msgspec.Struct]) -> set[str]:
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    return {f.encode_name for f in info.fields}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msg=messages(), data=st.data())
def test_unknown_fields_are_ignored(msg: Message, data: st.DataObject) -> None:
    cls = type(msg)
    wire = as_dict(msg)
    known = _field_names(cls) | {"type"}
    extra = data.draw(
        st.dictionaries(
            st.text(max_size=12).filter(lambda k: k not in known), any_values(), min_size=1
        )
    )
    # New fields may come before, between or after the known ones.
    items = list(wire.items()) + list(extra.items())
    order = data.draw(st.permutations(items))
    assert decode(pack(dict(order)), cls) == msg


def test_unknown_fields_inside_nested_structs_are_ignored() -> None:
    msg = EXAMPLES[CapacityReport]
    wire = as_dict(msg)
    wire["cpu"]["npu_cores"] = 2
    wire["memory"]["swap"] = {"total": 1, "free": 0}
    wire["slots"]["reserved"] = [1, 2, 3]
    wire["bench"]["int4_gops"] = 9.5
    wire["thermal"]["zones"] = [{"name": "soc", "c": 51.5}]
    wire["gpu"] = {"model": "none"}
    assert decode(pack(wire), CapacityReport) == msg


def test_unknown_fields_do_not_hide_invalid_known_ones() -> None:
    wire = as_dict(EXAMPLES[Task])
    wire["future"] = 1
    wire["attempt"] = 0
    assert refusal(pack(wire)).reason == "invalid"


# ---------------------------------------------------------------- values out of range


def _float_fields(cls: type[msgspec.Struct]) -> list[str]:
    """Top-level fields of ``cls`` that hold a float (alone or in an optional)."""
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    names = []
    for f in info.fields:
        members = f.type.types if isinstance(f.type, mi.UnionType) else (f.type,)
        if any(isinstance(m, mi.FloatType) for m in members):
            names.append(f.encode_name)
    return names


FLOAT_FIELDS = [(cls, name) for cls in MESSAGE_TYPES for name in _float_fields(cls)]


@pytest.mark.parametrize(("cls", "field"), FLOAT_FIELDS, ids=lambda x: getattr(x, "__name__", x))
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -1.0])
def test_non_finite_or_negative_floats_are_refused(
    cls: type[Message], field: str, value: float
) -> None:
    wire = as_dict(EXAMPLES[cls])
    wire[field] = value
    err = refusal(pack(wire))
    assert err.reason == "invalid"
    assert err.message_id == EXAMPLES[cls].id
    assert field in err.detail


def test_timestamp_fields_are_covered() -> None:
    covered = set(FLOAT_FIELDS)
    assert (Task, "expires_at") in covered
    assert (Task, "ts") in covered
    assert (State, "started_at") in covered
    assert (Result, "finished_at") in covered


@pytest.mark.parametrize("value", [math.nan, math.inf, -1.0])
def test_non_finite_nested_float_is_refused(value: float) -> None:
    wire = as_dict(EXAMPLES[CapacityReport])
    wire["bench"]["measured_at"] = value
    assert refusal(pack(wire)).reason == "invalid"
    wire = as_dict(EXAMPLES[CapacityReport])
    wire["cpu"]["freq_mhz"] = [1000.0, value]
    assert refusal(pack(wire)).reason == "invalid"


@pytest.mark.parametrize("field", ["fp32_gflops", "int8_gops"])
def test_implausible_bench_claims_are_refused(field: str) -> None:
    # Finding 12 of the hardening review: 1e18 GFLOP/s used to decode and pull work to the
    # device that claimed it.
    wire = as_dict(EXAMPLES[CapacityReport])
    wire["bench"][field] = MAX_BENCH_GOPS
    assert decode(pack(wire), CapacityReport).bench is not None
    for value in (MAX_BENCH_GOPS * 1.01, 1.0e18):
        wire["bench"][field] = value
        err = refusal(pack(wire))
        assert err.reason == "invalid"
        assert field in err.detail


def test_timestamp_far_in_the_future_is_refused() -> None:
    wire = as_dict(EXAMPLES[Task])
    wire["ts"] = 1.0e12
    assert refusal(pack(wire)).reason == "invalid"


@pytest.mark.parametrize(
    "bad_id",
    ["", "a" * 65, "has space", "line\n", "id\n", "\nid", "slash/id", "nul\x00", "é", 7, None],
)
def test_bad_message_ids_are_refused(bad_id: object) -> None:
    wire = as_dict(EXAMPLES[TaskAck])
    wire["id"] = bad_id
    err = refusal(pack(wire))
    assert err.reason == "invalid"
    # Only an id that would itself be valid is echoed back (it ends up in logs).
    assert err.message_id is None


@pytest.mark.parametrize("field", ["task_id"])
@pytest.mark.parametrize("bad", ["t\n", "a b", "a" * 65, ""])
def test_bad_referenced_ids_are_refused(field: str, bad: str) -> None:
    wire = as_dict(EXAMPLES[Result])
    wire[field] = bad
    err = refusal(pack(wire))
    assert err.reason == "invalid"
    assert err.message_id == EXAMPLES[Result].id


def test_bad_names_are_refused() -> None:
    wire = as_dict(EXAMPLES[Task])
    wire["kind"] = "infer\n"
    assert refusal(pack(wire)).reason == "invalid"
    wire = as_dict(EXAMPLES[State])
    wire["runtimes"] = ["onnx", "bad name"]
    assert refusal(pack(wire)).reason == "invalid"


def test_collection_limits_are_enforced() -> None:
    wire = as_dict(EXAMPLES[ResultAck])
    wire["ids"] = []
    assert refusal(pack(wire)).reason == "invalid"
    wire["ids"] = [f"r{i}" for i in range(1_001)]
    assert refusal(pack(wire)).reason == "invalid"
    wire = as_dict(EXAMPLES[Task])
    wire["params"] = {f"k{i}": i for i in range(257)}
    assert refusal(pack(wire)).reason == "invalid"


# ---------------------------------------------------------------- nesting depth


def _nested_lists(depth: int) -> msgspec.Raw:
    return msgspec.Raw(b"\x91" * depth + b"\xc0")


def _task_with_params(value: object) -> bytes:
    wire = as_dict(EXAMPLES[Task])
    wire["params"] = {"x": value}
    return pack(wire)


@pytest.mark.parametrize(
    "nested",
    [
        pytest.param(_nested_lists(10_000), id="fixarray"),
        pytest.param(msgspec.Raw(b"\x81\xa1k" * 10_000 + b"\xc0"), id="fixmap"),
        pytest.param(msgspec.Raw(b"\xdc\x00\x01" * 10_000 + b"\xc0"), id="array16"),
        pytest.param(msgspec.Raw(b"\xdd\x00\x00\x00\x01" * 10_000 + b"\xc0"), id="array32"),
        pytest.param(msgspec.Raw(b"\xdf\x00\x00\x00\x01\xc0" * 10_000 + b"\xc0"), id="map32"),
        pytest.param(msgspec.Raw(b"\x92\xc0" * 10_000 + b"\xc0"), id="last-item-nests"),
    ],
)
def test_deep_params_raise_decode_error(nested: msgspec.Raw) -> None:
    err = refusal(_task_with_params(nested))
    assert err.reason == "too_deep"


def test_deep_value_in_an_unknown_field_raises_decode_error() -> None:
    wire = as_dict(EXAMPLES[Result])
    wire["future"] = _nested_lists(10_000)
    assert refusal(pack(wire)).reason == "too_deep"


def test_deep_top_level_raises_decode_error() -> None:
    assert refusal(b"\x91" * 100_000 + b"\xc0").reason == "too_deep"
    assert refusal(b"\x81\xc0" * 100_000 + b"\xc0").reason == "too_deep"


def test_nesting_up_to_the_limit_is_accepted() -> None:
    # The message map and the params map are two levels; the rest is the value's own.
    ok = decode(_task_with_params(_nested_lists(MAX_DEPTH - 2)), Task)
    value = ok.params["x"]
    for _ in range(MAX_DEPTH - 2):
        assert isinstance(value, list)
        assert len(value) == 1
        value = value[0]
    assert value is None
    assert refusal(_task_with_params(_nested_lists(MAX_DEPTH - 1))).reason == "too_deep"


def test_many_shallow_containers_are_not_too_deep() -> None:
    params = {f"k{i}": [[i], {"a": [i]}] for i in range(200)}
    msg = Task(id="t", ts=1.0, task_id="t", kind="k", params=params, expires_at=2.0)
    assert decode(encode(msg)) == msg


def test_deep_nesting_cannot_crash_with_a_raised_recursion_limit() -> None:
    # With a raised recursion limit, msgspec's own recursion guard comes after the C stack
    # is exhausted; the codec's depth limit must stop such a payload first.
    script = textwrap.dedent(
        """
        import sys
        from lepton.protocol.codec import decode
        from lepton.protocol.errors import DecodeError
        sys.setrecursionlimit(10**7)
        try:
            decode(b"\\x91" * 250_000 + b"\\xc0")
        except DecodeError as err:
            print(err.reason)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "too_deep"


def _depth(value: object) -> int:
    """Nesting of non-empty arrays/maps, as the codec counts it."""
    if isinstance(value, list) and value:
        return 1 + max(_depth(v) for v in value)
    if isinstance(value, dict) and value:
        return 1 + max(max(_depth(k), _depth(v)) for k, v in value.items())
    return 0


# The depth scan is private, but it is the guard that keeps hostile nesting away from the C
# decoder, so it is checked directly against the structure it scans, at small limits.
@settings(max_examples=80, deadline=None)
@given(value=any_values(max_leaves=30), limit=st.integers(0, 6))
def test_depth_scan_agrees_with_the_structure(value: object, limit: int) -> None:
    data = pack(value)
    assume(len(data.translate(None, codec._NOT_CONTAINER_HEADS)) > limit)
    assert codec._too_deep(data, limit) == (_depth(value) > limit)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200), limit=st.integers(0, 4))
def test_depth_scan_never_fails_on_garbage(data: bytes, limit: int) -> None:
    assert codec._too_deep(data, limit) in (True, False)


# ---------------------------------------------------------------- the error itself


def test_decode_error_carries_machine_readable_fields() -> None:
    wire = as_dict(EXAMPLES[Task])
    wire["attempt"] = 0
    err = refusal(pack(wire))
    assert isinstance(err, LeptonError)
    assert err.reason == "invalid"
    assert "attempt" in err.detail
    assert err.message_id == "t-1"
    assert str(err).startswith("invalid: ")
    assert isinstance(err.__cause__, msgspec.DecodeError)


def test_decode_error_without_detail() -> None:
    err = DecodeError("empty")
    assert str(err) == "empty"
    assert err.detail == ""
    assert err.message_id is None


def test_data_sizes_are_bounded_counts_per_source_name() -> None:
    # A federated round bounds a device's claimed example count by the size it reported for
    # the data source (finding 4 of the hardening review): the map is small and well formed.
    wire = as_dict(EXAMPLES[CapacityReport])
    assert wire["data_sizes"] == {}
    wire["data_sizes"] = {"digits": 1437, "cam/frames": 0}
    assert decode(pack(wire), CapacityReport).data_sizes == {"digits": 1437, "cam/frames": 0}
    for bad in (
        {"digits": -1},
        {"digits": 2**63},
        {"digits": 1.5},
        {"bad name": 3},
        {f"s{i}": 1 for i in range(65)},
    ):
        wire["data_sizes"] = bad
        err = refusal(pack(wire))
        assert err.reason == "invalid", bad
        assert "data_sizes" in err.detail
    # A sender that predates the field: an empty map.
    del wire["data_sizes"]
    assert decode(pack(wire), CapacityReport).data_sizes == {}
