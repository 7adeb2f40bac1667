"""The weights/update wire format: round trips, compression, validation, hostile bytes."""

from __future__ import annotations

import contextlib
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lepton.protocol.errors import DecodeError
from lepton.protocol.tensors import TensorPayload, quantize_int8, to_payload
from lepton.protocol.weights import (
    FORMAT,
    FORMAT_VERSION,
    INT8_MIN_ELEMENTS,
    NamedTensor,
    WeightsBlob,
    decode_weights,
    encode_weights,
    sha256_hex,
)

BASE = "ab" * 32
LIMIT = 1 << 24

names = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x2FF, exclude_characters="\x7f"),
    min_size=1,
    max_size=24,
)
shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6)
finite_f32 = st.floats(-1e4, 1e4, width=32, allow_nan=False)
float_arrays = hnp.arrays(np.float32, shapes, elements=finite_f32)
int_arrays = hnp.arrays(st.sampled_from([np.int64, np.int32, np.uint8, np.bool_]), shapes)
states = st.dictionaries(names, st.one_of(float_arrays, int_arrays), max_size=6)


def wire(blob: WeightsBlob) -> bytes:
    return msgspec.msgpack.encode(blob)


def blob(tensors: list[NamedTensor], **fields: Any) -> WeightsBlob:
    base: dict[str, Any] = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "kind": "weights",
        "compression": "fp32",
    }
    return WeightsBlob(tensors=tensors, **(base | fields))


def decodes_or_refuses(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode_weights(data, max_bytes=LIMIT)


def model_state(seed: int = 0) -> dict[str, npt.NDArray[Any]]:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": rng.normal(0, 0.1, (16, 8, 3, 3)).astype(np.float32),
        "conv.bias": rng.normal(0, 0.1, 16).astype(np.float32),
        "fc1.weight": rng.normal(0, 0.1, (256, 64)).astype(np.float32),
        "fc1.bias": rng.normal(0, 0.1, 256).astype(np.float32),
        "fc2.weight": rng.normal(0, 0.1, (10, 256)).astype(np.float32),
        "fc2.bias": rng.normal(0, 0.1, 10).astype(np.float32),
        "bn.num_batches_tracked": np.array(12, dtype=np.int64),
    }


# ---------------------------------------------------------------- round trips


@settings(max_examples=80, deadline=None)
@given(state=states)
def test_fp32_round_trip_is_exact_and_ordered(state: dict[str, npt.NDArray[Any]]) -> None:
    meta, out = decode_weights(encode_weights(state, kind="weights"), max_bytes=LIMIT)
    assert list(out) == list(state)
    assert meta.num_tensors == len(state)
    assert meta.num_elements == sum(a.size for a in state.values())
    for name, arr in state.items():
        assert out[name].dtype == arr.dtype
        np.testing.assert_array_equal(out[name], arr)


@settings(max_examples=60, deadline=None)
@given(state=states)
def test_fp16_round_trip_within_half_precision(state: dict[str, npt.NDArray[Any]]) -> None:
    data = encode_weights(state, kind="update", compression="fp16", base=BASE, round=4)
    meta, out = decode_weights(data, max_bytes=LIMIT)
    assert (meta.kind, meta.compression, meta.base, meta.round) == ("update", "fp16", BASE, 4)
    for name, arr in state.items():
        if arr.dtype.kind == "f":
            assert out[name].dtype == np.float32
            # float16: 11 significant bits; below its normal range, steps of 2**-24.
            bound = np.abs(arr) * 2.0**-11 + 2.0**-24
            assert np.all(np.abs(out[name] - arr) <= bound)
        else:
            np.testing.assert_array_equal(out[name], arr)


@settings(max_examples=60, deadline=None)
@given(state=states, per_channel_min=st.sampled_from([0, 4, 256, None]))
def test_int8_round_trip_within_half_a_step(
    state: dict[str, npt.NDArray[Any]], per_channel_min: int | None
) -> None:
    data = encode_weights(
        state, kind="weights", compression="int8", per_channel_min=per_channel_min
    )
    _, out = decode_weights(data, max_bytes=LIMIT)
    for name, arr in state.items():
        if arr.dtype.kind != "f":
            np.testing.assert_array_equal(out[name], arr)
            continue
        x = arr.astype(np.float64)
        # Per-tensor range (zero included) bounds every per-channel step too.
        span = max(float(x.max(initial=0.0)), 0.0) - min(float(x.min(initial=0.0)), 0.0)
        bound = span / 255.0 * 0.5 * (1 + 1e-6) + np.abs(x) * 2.0**-11 + 2.0**-24
        assert np.all(np.abs(out[name] - x) <= bound)


def test_decoded_arrays_belong_to_the_caller() -> None:
    _, out = decode_weights(encode_weights(model_state(), kind="weights"), max_bytes=LIMIT)
    for arr in out.values():
        assert arr.flags.writeable
        arr[...] = 0


def test_encoding_is_deterministic_and_content_addressed() -> None:
    a = encode_weights(model_state(), kind="weights", compression="int8")
    b = encode_weights(model_state(), kind="weights", compression="int8")
    assert a == b
    assert sha256_hex(a) == sha256_hex(b)
    assert len(sha256_hex(a)) == 64


# ---------------------------------------------------------------- compression choices


def _layouts(data: bytes) -> dict[str, tuple[str, int | None]]:
    """How each tensor travels: (wire dtype, quantization axis)."""
    out: dict[str, tuple[str, int | None]] = {}
    for t in msgspec.msgpack.decode(data, type=WeightsBlob).tensors:
        if t.quant is not None:
            out[t.name] = ("int8", t.quant.axis)
        else:
            assert t.dense is not None
            out[t.name] = (t.dense.dtype, None)
    return out


def test_int8_layout_per_tensor_per_channel_and_small_tensors() -> None:
    rng = np.random.default_rng(0)
    state = {
        "wide": rng.normal(size=(4, 256)).astype(np.float32),  # 256 per channel
        "narrow": rng.normal(size=(4, 255)).astype(np.float32),
        "vector": rng.normal(size=300).astype(np.float32),
        "small": rng.normal(size=INT8_MIN_ELEMENTS - 1).astype(np.float32),
        "huge_small": np.array([1e6, -1e6], dtype=np.float32),  # beyond float16
        "count": np.array(3, dtype=np.int64),
    }
    layouts = _layouts(encode_weights(state, kind="weights", compression="int8"))
    assert layouts == {
        "wide": ("int8", 0),
        "narrow": ("int8", None),
        "vector": ("int8", None),
        "small": ("float16", None),
        "huge_small": ("float32", None),
        "count": ("int64", None),
    }
    always = _layouts(encode_weights(state, kind="weights", compression="int8", per_channel_min=0))
    assert always["narrow"] == ("int8", 0)
    never = _layouts(
        encode_weights(state, kind="weights", compression="int8", per_channel_min=None)
    )
    assert never["wide"] == ("int8", None)


def test_compressed_sizes() -> None:
    state = model_state()
    fp32 = len(encode_weights(state, kind="update", base=BASE))
    fp16 = len(encode_weights(state, kind="update", base=BASE, compression="fp16"))
    int8 = len(encode_weights(state, kind="update", base=BASE, compression="int8"))
    raw = sum(a.nbytes for a in state.values())
    assert fp32 < raw * 1.02
    assert 0.49 < fp16 / fp32 < 0.51
    assert int8 / fp32 < 0.27


# ---------------------------------------------------------------- encoder arguments


@pytest.mark.parametrize(
    ("state", "kwargs", "match"),
    [
        ({"w": np.zeros(2)}, {"kind": "update"}, "base"),
        ({"w": np.zeros(2)}, {"kind": "update", "base": "AB" * 32}, "lowercase hex"),
        ({"w": np.zeros(2)}, {"kind": "delta"}, "kind"),
        ({"w": np.zeros(2)}, {"kind": "weights", "compression": "fp8"}, "compression"),
        ({"w": np.zeros(2)}, {"kind": "weights", "round": -1}, "round"),
        ({"w": np.zeros(2)}, {"kind": "weights", "job": "a\nb"}, "job"),
        ({"w": np.array([np.nan])}, {"kind": "weights"}, "non-finite"),
        ({"w": np.array([1e300])}, {"kind": "weights"}, "float32 range"),
        ({"w": np.full(100, 1e5)}, {"kind": "weights", "compression": "fp16"}, "float16"),
        ({"": np.zeros(1)}, {"kind": "weights"}, "name"),
        ({"a\x00": np.zeros(1)}, {"kind": "weights"}, "name"),
        ({"w": np.array(["text"])}, {"kind": "weights"}, "dtype"),
    ],
)
def test_encoder_refuses_bad_arguments(
    state: dict[str, Any], kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        encode_weights(state, **kwargs)


def test_large_values_survive_int8() -> None:
    state = {"w": np.full(100, 1e5, dtype=np.float32)}
    _, out = decode_weights(
        encode_weights(state, kind="weights", compression="int8"), max_bytes=LIMIT
    )
    np.testing.assert_allclose(out["w"], state["w"], rtol=1e-3)


# ---------------------------------------------------------------- decoder validation


def _dense(name: str, arr: npt.ArrayLike) -> NamedTensor:
    return NamedTensor(name=name, dense=to_payload(np.asarray(arr)))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"\xc1", "malformed"),
        (msgspec.msgpack.encode({"format": FORMAT}), "malformed"),
        (wire(blob([], format="other")), "bad_format"),
        (wire(blob([], version=FORMAT_VERSION + 1)), "unsupported_version"),
        (wire(blob([], kind="update")), "missing_base"),
        (wire(blob([_dense("a", [1.0]), _dense("a", [2.0])])), "duplicate_name"),
        (wire(blob([NamedTensor(name="a")])), "bad_tensor"),
        (
            wire(
                blob([NamedTensor(name="a", dense=to_payload([1.0]), quant=quantize_int8([1.0]))])
            ),
            "bad_tensor",
        ),
        (wire(blob([_dense("a", np.array([np.nan], dtype=np.float32))])), "non_finite"),
        (wire(blob([_dense("a", np.array([np.inf], dtype=np.float16))])), "non_finite"),
        (
            wire(
                blob(
                    [
                        NamedTensor(
                            name="a",
                            dense=TensorPayload(dtype="float32", shape=[3], data=b"\0" * 4),
                        )
                    ]
                )
            ),
            "bad_length",
        ),
        (
            msgspec.msgpack.encode(
                {
                    "format": FORMAT,
                    "version": 1,
                    "kind": "weights",
                    "compression": "fp32",
                    "tensors": [
                        [
                            "a",
                            None,
                            {"shape": [2], "data": b"\0\0", "scale": [0.0], "zero_point": [0]},
                        ]
                    ],
                }
            ),
            "bad_quant_params",
        ),
        (
            msgspec.msgpack.encode(
                {
                    "format": FORMAT,
                    "version": 1,
                    "kind": "weights",
                    "compression": "fp32",
                    "tensors": [["bad\nname", {"dtype": "float32", "shape": [0], "data": b""}]],
                }
            ),
            "malformed",
        ),
    ],
)
def test_decoder_refuses_malformed_blobs(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode_weights(data, max_bytes=LIMIT)
    assert info.value.reason == reason


def test_size_cap_is_checked_first() -> None:
    data = encode_weights(model_state(), kind="weights")
    with pytest.raises(DecodeError) as info:
        decode_weights(data, max_bytes=len(data) - 1)
    assert info.value.reason == "oversized"
    decode_weights(data, max_bytes=len(data))
    with pytest.raises(DecodeError) as info:
        decode_weights("text", max_bytes=LIMIT)  # type: ignore[arg-type]
    assert info.value.reason == "not_bytes"


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    payload = msgspec.msgpack.decode(encode_weights({"w": np.ones(2)}, kind="weights"))
    payload["signature"] = b"future"
    meta, out = decode_weights(msgspec.msgpack.encode(payload), max_bytes=LIMIT)
    assert meta.kind == "weights"
    np.testing.assert_array_equal(out["w"], [1.0, 1.0])


# ---------------------------------------------------------------- hostile bytes

WIRES = [
    encode_weights(model_state(), kind="weights", compression=c) for c in ("fp32", "fp16", "int8")
] + [encode_weights({"x": np.arange(6, dtype=np.int32).reshape(2, 3)}, kind="update", base=BASE)]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_raise_only_decode_error(data: bytes) -> None:
    decodes_or_refuses(data)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid blob damaged by a few bit flips, cuts, insertions and byte changes."""
    data = bytearray(draw(st.sampled_from(WIRES)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "set"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif op == "set" and data:
            data[at] = draw(st.integers(0, 255))
    return bytes(data)


@settings(max_examples=300, deadline=None)
@given(mutated())
def test_mutated_blobs_raise_only_decode_error(data: bytes) -> None:
    decodes_or_refuses(data)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_header_fields_replaced_by_anything_raise_only_decode_error(data: st.DataObject) -> None:
    payload = msgspec.msgpack.decode(data.draw(st.sampled_from(WIRES)))
    key = data.draw(st.sampled_from(sorted(payload)))
    value = data.draw(
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(-(2**63), 2**64 - 1),
            st.floats(),
            st.text(max_size=8),
            st.binary(max_size=8),
            st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3),
        )
    )
    payload[key] = value
    decodes_or_refuses(msgspec.msgpack.encode(payload))
