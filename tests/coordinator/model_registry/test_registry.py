from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest
from sqlalchemy import create_engine

from lepton.coordinator.errors import ConflictError, NotFoundError
from lepton.coordinator.model_registry import tables
from lepton.coordinator.model_registry.errors import BlobIntegrityError
from lepton.coordinator.model_registry.introspect import TensorSpec
from lepton.coordinator.model_registry.registry import ModelRegistry


def test_import_reads_specs_and_round_trips(registry: ModelRegistry, digits_fp32: Path) -> None:
    rec = registry.import_file(
        digits_fp32,
        name="digits",
        format="onnx",
        precision="fp32",
        accuracy_fp32=0.9778,
        eval_samples=450,
    )
    data = digits_fp32.read_bytes()
    assert rec.version == 1
    assert rec.digest == hashlib.sha256(data).hexdigest()
    assert rec.size == len(data)
    assert rec.inputs == (TensorSpec("input", "float32", ("batch", 1, 8, 8)),)
    assert rec.outputs == (TensorSpec("logits", "float32", ("batch", 10)),)
    assert rec.param_count == 7178  # conv 80 + 1168 + 4640, linear 1290
    assert rec.flops == 2 * (64 * 8 * 9 + 64 * 16 * 72 + 16 * 32 * 144 + 10 * 128)
    assert registry.get("digits") == rec
    assert registry.get("digits", 1) == rec
    assert registry.by_digest(rec.digest) == rec
    assert registry.list() == [rec]
    assert registry.blob_path(rec.digest).read_bytes() == data
    with registry.open_blob(rec.digest) as fh:
        assert fh.read() == data
    assert registry.blob_path(rec.digest).relative_to(registry.blobs.root).parts == (
        "blobs",
        "sha256",
        rec.digest[:2],
        rec.digest,
    )
    assert rec.to_dict()["inputs"] == [
        {"name": "input", "dtype": "float32", "shape": ["batch", 1, 8, 8]}
    ]


def test_versions_parent_and_lookup_filters(registry: ModelRegistry, tmp_path: Path) -> None:
    fp32 = registry.import_bytes(b"fp32 weights", name="m", format="torch", precision="fp32")
    int8 = registry.import_bytes(
        b"int8 weights",
        name="m",
        format="torch",
        precision="int8",
        parent_version=fp32.version,
        calibration={"method": "minmax", "samples": 256},
        accuracy_int8=0.97,
    )
    assert (fp32.version, int8.version) == (1, 2)
    assert int8.parent_version == 1
    assert int8.calibration == {"method": "minmax", "samples": 256}
    assert registry.get("m") == int8
    assert registry.get("m", precision="fp32") == fp32
    assert registry.get("m", precision="int8", format="torch") == int8
    with pytest.raises(NotFoundError):
        registry.get("m", format="onnx")
    assert registry.names() == ["m"]
    with pytest.raises(NotFoundError):
        registry.get("m", 2, precision="fp32")
    with pytest.raises(NotFoundError):
        registry.get("nope")
    with pytest.raises(NotFoundError):
        registry.by_digest("0" * 64)
    with pytest.raises(NotFoundError):
        registry.import_bytes(b"x", name="m", format="torch", precision="int8", parent_version=9)
    with pytest.raises(ConflictError):
        registry.import_bytes(b"other", name="m", format="torch", precision="fp32", version=1)
    pinned = registry.import_bytes(b"other", name="m", format="torch", precision="fp32", version=7)
    assert pinned.version == 7
    assert registry.import_bytes(b"next", name="m", format="torch", precision="fp32").version == 8


def test_same_bytes_deduplicate(registry: ModelRegistry) -> None:
    a = registry.import_bytes(b"same", name="a", format="torch", precision="fp32")
    again = registry.import_bytes(b"same", name="a", format="torch", precision="fp32")
    b = registry.import_bytes(b"same", name="b", format="torch", precision="fp32")
    assert again == a
    assert b.digest == a.digest
    assert b.name == "b"
    assert len(registry.list("a")) == 1
    assert registry.by_digest(a.digest) == a  # the first registered
    files = [p for p in (registry.blobs.root / "blobs" / "sha256").rglob("*") if p.is_file()]
    assert len(files) == 1
    assert registry.put_bytes(b"same") == a.digest


def test_unreadable_onnx_is_refused(registry: ModelRegistry) -> None:
    with pytest.raises(ValueError, match="ONNX"):
        registry.import_bytes(b"not a model", name="x", format="onnx", precision="fp32")
    assert registry.list() == []


def test_bad_arguments(registry: ModelRegistry) -> None:
    for bad in ("", "../x", "a/b", "-lead", "x" * 129):
        with pytest.raises(ValueError, match="model name"):
            registry.import_bytes(b"x", name=bad, format="torch", precision="fp32")
    with pytest.raises(ValueError, match="format"):
        registry.import_bytes(b"x", name="ok", format="pickle", precision="fp32")
    with pytest.raises(ValueError, match="precision"):
        registry.import_bytes(b"x", name="ok", format="onnx", precision="fp16")
    for bad in ("ABC", "0" * 63, "g" * 64, "0" * 64 + "\n", "../" + "0" * 61):
        with pytest.raises(ValueError, match="sha256"):
            registry.blob_path(bad)
    with pytest.raises(NotFoundError):
        registry.blob_path("f" * 64)


def test_put_checks_the_expected_digest(registry: ModelRegistry) -> None:
    good = hashlib.sha256(b"payload").hexdigest()
    assert registry.put_bytes(b"payload", expected=good) == good
    with pytest.raises(BlobIntegrityError) as info:
        registry.put_bytes(b"tampered", expected="1" * 64)
    assert info.value.expected == "1" * 64
    assert info.value.actual == hashlib.sha256(b"tampered").hexdigest()
    assert not registry.blobs.exists(info.value.actual)


def test_write_is_atomic_and_leaves_no_temp_files(
    registry: ModelRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    digest = hashlib.sha256(b"big" * 1000).hexdigest()

    def crash(src: object, dst: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        registry.put_bytes(b"big" * 1000)
    monkeypatch.undo()
    # Nothing half-written under the final name, no temp file left behind.
    assert not registry.blobs.exists(digest)
    assert list((registry.blobs.root / "blobs" / "tmp").iterdir()) == []
    assert registry.put_bytes(b"big" * 1000) == digest
    path = registry.blob_path(digest)
    assert path.read_bytes() == b"big" * 1000
    assert not os.access(path, os.W_OK) or os.geteuid() == 0
    assert path.stat().st_mode & 0o222 == 0  # stored read-only


def test_corrupt_blob_is_detected_and_repaired(registry: ModelRegistry) -> None:
    rec = registry.import_bytes(b"good bytes", name="c", format="torch", precision="fp32")
    assert registry.verify_blob(rec.digest) == len(b"good bytes")
    path = registry.blob_path(rec.digest)
    path.chmod(0o644)
    path.write_bytes(b"bad bytes!")
    with pytest.raises(BlobIntegrityError):
        registry.verify_blob(rec.digest)
    with pytest.raises(BlobIntegrityError):
        registry.read_blob(rec.digest)
    # Storing the right bytes again replaces the corrupt file.
    registry.put_bytes(b"good bytes")
    assert registry.read_blob(rec.digest) == b"good bytes"


def test_concurrent_imports_get_distinct_versions(engine: object, tmp_path: Path) -> None:
    from sqlalchemy import Engine

    assert isinstance(engine, Engine)
    if engine.dialect.name == "sqlite":
        # A file database shared by threads: give writers time to take the lock.
        engine = create_engine(str(engine.url), connect_args={"timeout": 30})
    reg = ModelRegistry(engine, tmp_path / "data")
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            reg.import_bytes(f"model {i}".encode(), name="race", format="torch", precision="fp32")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(r.version for r in reg.list("race")) == [1, 2, 3, 4, 5, 6]


def test_tables_live_on_their_own_metadata() -> None:
    assert set(tables.metadata.tables) == {"model_blobs", "model_versions"}


def test_tflite_import_reads_specs(registry: ModelRegistry, digits_fp32: Path) -> None:
    pytest.importorskip("ai_edge_litert.interpreter", reason="the tflite extra is not installed")
    path = digits_fp32.parent / "digits_int8.tflite"
    rec = registry.import_file(path, name="digits-tflite", format="tflite", precision="int8")
    assert rec.inputs[0].dtype == "int8"
    assert rec.inputs[0].shape[1:] == (8, 8, 1)
    assert rec.outputs[0].shape[-1] == 10
    with pytest.raises(ValueError, match="TFLite"):
        registry.import_bytes(b"junk", name="t", format="tflite", precision="int8")
