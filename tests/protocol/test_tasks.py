"""The per-kind task contracts: every kind's params and output survive the wire (struct ->
mapping -> MessagePack envelope -> mapping -> struct), bounds are enforced on decode, and the
registry names every kind."""

from __future__ import annotations

import time
import typing
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lepton.protocol import codec, tasks
from lepton.protocol.messages import Result, Task
from tests.protocol.strategies import structs

KINDS = typing.get_args(tasks.TaskKind)


def _has_bytes(value: Any) -> bool:
    if isinstance(value, msgspec.Struct):
        return _has_bytes(msgspec.to_builtins(value, builtin_types=(bytes, bytearray)))
    if isinstance(value, (bytes, bytearray)):
        return True
    if isinstance(value, dict):
        return any(_has_bytes(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_bytes(v) for v in value)
    return False


def _kind_and(table: dict[Any, type[msgspec.Struct]]) -> st.SearchStrategy[tuple[str, Any]]:
    return st.one_of(*(structs(cls).map(lambda s, k=kind: (k, s)) for kind, cls in table.items()))


def test_every_kind_has_params_and_an_output() -> None:
    assert set(tasks.PARAMS) == set(KINDS) == set(tasks.OUTPUTS)
    assert tasks.TASK_KINDS == KINDS
    constants = {
        tasks.ECHO,
        tasks.BENCHMARK,
        tasks.DEPLOY,
        tasks.UNDEPLOY,
        tasks.INFER,
        tasks.TRAIN,
        tasks.EVALUATE,
        tasks.INSTALL,
        tasks.REVERT,
    }
    assert constants == set(KINDS)


def test_the_agent_registers_a_handler_for_every_kind() -> None:
    from lepton.agent.handlers import default_registry

    assert default_registry().kinds() == sorted(KINDS)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_kind_and(tasks.PARAMS))
def test_params_round_trip_through_a_task(case: tuple[str, Any]) -> None:
    kind, params = case
    mapping = tasks.encode_params(kind, params)  # type: ignore[arg-type]
    message = Task(task_id="t1", kind=kind, params=mapping, expires_at=time.time() + 60)
    received = codec.decode(codec.encode(message), Task)
    decoded = tasks.decode_params(kind, received.params)
    assert type(decoded) is type(params)
    if not _has_bytes(params):  # bytes in a free-form field travel as base64 text
        assert decoded == params
    assert tasks.encode_params(kind, decoded) == mapping  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_kind_and(tasks.OUTPUTS))
def test_outputs_round_trip_through_a_result(case: tuple[str, Any]) -> None:
    kind, output = case
    mapping = tasks.encode_output(kind, output)  # type: ignore[arg-type]
    message = Result(task_id="t1", status="succeeded", output=mapping, attempt=1)
    received = codec.decode(codec.encode(message), Result)
    decoded = tasks.decode_output(kind, received.output)
    assert type(decoded) is type(output)
    if not _has_bytes(output):
        assert decoded == output


def test_defaults_stay_off_the_wire_and_come_back() -> None:
    params = tasks.InferParams(model="clf", source="val")
    assert tasks.encode_params(tasks.INFER, params) == {"model": "clf", "source": "val"}
    back = tasks.decode_params(tasks.INFER, {"model": "clf", "source": "val", "timeout_s": 5})
    assert back == params  # unknown keys are ignored, defaults filled in


@pytest.mark.parametrize(
    ("kind", "params", "field"),
    [
        (tasks.INFER, {"model": "clf", "source": "val", "batch_size": 0}, "batch_size"),
        (tasks.INFER, {"model": "clf", "source": "val", "batch_size": "8"}, "batch_size"),
        (tasks.ECHO, {"sleep_s": True}, "sleep_s"),
        (tasks.ECHO, {"sleep_s": 1e9}, "sleep_s"),
        (tasks.UNDEPLOY, {"name": "no spaces"}, "name"),
        (tasks.TRAIN, {"job": "j"}, "round"),
    ],
)
def test_a_broken_bound_names_its_field(kind: str, params: dict[str, Any], field: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=rf"`\$\.{field}`|required field `{field}`"):
        tasks.decode_params(kind, params)


def test_encoding_checks_the_bounds_the_constructor_does_not() -> None:
    with pytest.raises(msgspec.ValidationError, match="batch_size"):
        tasks.encode_params(tasks.INFER, tasks.InferParams(model="m", source="s", batch_size=0))
    with pytest.raises(TypeError, match="InferParams"):
        tasks.encode_params(tasks.TRAIN, tasks.InferParams(model="m", source="s"))
    with pytest.raises(ValueError, match="no params contract"):
        tasks.decode_params("plugin-kind", {})


def test_a_deploy_digest_is_lower_cased_on_decode() -> None:
    params = {"name": "m", "digest": "A" * 64, "size": 1, "url": "http://x/b", "format": "onnx"}
    assert tasks.decode_params(tasks.DEPLOY, params).digest == "a" * 64


def test_the_protocol_task_contracts_need_msgspec_only() -> None:
    import subprocess
    import sys

    code = (
        "import sys; import lepton.protocol.tasks; "
        "print(sorted(m for m in ('numpy', 'torch', 'lepton.agent', 'lepton.coordinator') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_blob_digests_name_what_a_task_fetches() -> None:
    d = "AB" * 32
    weights = {"digest": f"sha256:{d}", "size": 10, "url": "http://c/v1/blobs/x"}
    deploy = {"name": "m", "digest": d, "size": 1, "url": "http://c/b", "format": "onnx"}
    train = {
        "job": "j",
        "round": 1,
        "model": "lepton.models.mlp:build",
        "weights": weights,
        "data": "local",
        "upload": {"url": "http://c/u"},
    }
    evaluate = {"model": "lepton.models.mlp:build", "weights": weights, "data": "local"}
    for kind, params in (("deploy", deploy), ("train", train), ("evaluate", evaluate)):
        assert tasks.blob_digests(kind, params) == {d.lower()}, kind
    assert tasks.blob_digests("echo", {"payload": d}) == frozenset()
    assert tasks.blob_digests("deploy", {**deploy, "size": -1}) == frozenset()  # broken
    assert tasks.blob_digests("nonsense", deploy) == frozenset()
