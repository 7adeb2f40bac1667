"""The content-addressed model registry: blobs on disk by sha256, metadata in SQL.

A model is a ``name`` with versions 1, 2, ...; each version is one file (ONNX, TFLite or a
torch state dict) at one precision, described by its input/output specs, size, parameter
count, FLOPs estimate, accuracies and, for an INT8 model, its calibration and the FP32
version it was made from. Bytes are stored once however many versions point at them, and
importing the same bytes under the same name again returns the existing version.
"""

from __future__ import annotations

import builtins
import hashlib
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final, Literal, get_args

from sqlalchemy import Engine, RowMapping, and_, func, insert, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from lepton.coordinator.errors import ConflictError, NotFoundError
from lepton.coordinator.model_registry import tables
from lepton.coordinator.model_registry.blobstore import BlobStore, check_digest
from lepton.coordinator.model_registry.errors import BlobIntegrityError
from lepton.coordinator.model_registry.introspect import ModelInfo, TensorSpec, inspect_model

ModelFormat = Literal["onnx", "tflite", "torch"]
Precision = Literal["fp32", "int8"]
FORMATS: Final = get_args(ModelFormat)
PRECISIONS: Final = get_args(Precision)
NAME_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_NAME_RE: Final = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
_VERSION_RETRIES: Final = 8


def check_name(name: str) -> str:
    """``name`` if it is a valid model name (letters, digits, ``._-``), else ``ValueError``."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"invalid model name {name!r:.80}: use letters, digits and ._-")
    return name


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelRecord:
    """One registered model version (accuracies are fractions in [0, 1])."""

    name: str
    version: int
    digest: str
    size: int
    format: str
    precision: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    param_count: int | None
    flops: int | None
    accuracy_fp32: float | None
    accuracy_int8: float | None
    eval_samples: int | None
    calibration: dict[str, Any] | None
    parent_version: int | None
    created_at: float

    @classmethod
    def from_row(cls, row: RowMapping) -> ModelRecord:
        return cls(
            name=row["name"],
            version=row["version"],
            digest=row["digest"],
            size=row["size"],
            format=row["format"],
            precision=row["precision"],
            inputs=tuple(TensorSpec.from_dict(d) for d in row["inputs"]),
            outputs=tuple(TensorSpec.from_dict(d) for d in row["outputs"]),
            param_count=row["param_count"],
            flops=row["flops"],
            accuracy_fp32=row["accuracy_fp32"],
            accuracy_int8=row["accuracy_int8"],
            eval_samples=row["eval_samples"],
            calibration=row["calibration"],
            parent_version=row["parent_version"],
            created_at=row["created_at"],
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (what ``GET /v1/models`` returns)."""
        return {
            "name": self.name,
            "version": self.version,
            "digest": self.digest,
            "size": self.size,
            "format": self.format,
            "precision": self.precision,
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
            "param_count": self.param_count,
            "flops": self.flops,
            "accuracy_fp32": self.accuracy_fp32,
            "accuracy_int8": self.accuracy_int8,
            "eval_samples": self.eval_samples,
            "calibration": self.calibration,
            "parent_version": self.parent_version,
            "created_at": self.created_at,
        }


class ModelRegistry:
    """Models in SQL (``engine``) with their bytes under ``data_dir/blobs``.

    ``create_tables`` creates the registry's tables if missing (harmless when the
    coordinator's store already did). Every method is safe to call from several threads
    and processes; version numbers are allocated in the database.
    """

    def __init__(
        self,
        engine: Engine,
        data_dir: str | os.PathLike[str],
        *,
        create_tables: bool = True,
    ) -> None:
        self.engine = engine
        self.blobs = BlobStore(data_dir)
        if create_tables:
            tables.metadata.create_all(engine)

    # ------------------------------------------------------------------ blobs

    def put_bytes(self, data: bytes, *, expected: str | None = None) -> str:
        """Store bytes by content; returns the digest (``BlobIntegrityError`` on mismatch)."""
        digest, size = self.blobs.put_bytes(data, expected=expected)
        with self.engine.begin() as conn:
            self._record_blob(conn, digest, size)
        return digest

    def put_stream(self, fh: BinaryIO, *, expected: str | None = None) -> str:
        """Store what is left in ``fh`` by content; returns the digest."""
        digest, size = self.blobs.put_stream(fh, expected=expected)
        with self.engine.begin() as conn:
            self._record_blob(conn, digest, size)
        return digest

    def blob_path(self, digest: str) -> Path:
        """A stored blob's path; ``ValueError`` for a bad digest, ``NotFoundError`` if absent."""
        return self.blobs.existing_path(digest)

    def open_blob(self, digest: str) -> BinaryIO:
        """A binary file object over a stored blob (the caller closes it)."""
        return self.blob_path(digest).open("rb")

    def read_blob(self, digest: str) -> bytes:
        """A stored blob's bytes, checked against its digest (``BlobIntegrityError``)."""
        data = self.blob_path(digest).read_bytes()
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise BlobIntegrityError(digest, actual, where=str(self.blobs.path(digest)))
        return data

    def verify_blob(self, digest: str) -> int:
        """Re-hash a stored blob: its size, or ``BlobIntegrityError`` if it is corrupt."""
        return self.blobs.verify(digest)

    def _record_blob(self, conn: Connection, digest: str, size: int) -> None:
        exists = conn.execute(
            select(tables.blobs.c.digest).where(tables.blobs.c.digest == digest)
        ).first()
        if exists is None:
            # A concurrent writer may insert the same digest: a savepoint keeps our
            # transaction usable when the insert loses that race.
            try:
                with conn.begin_nested():
                    conn.execute(
                        insert(tables.blobs).values(
                            digest=digest, size=size, created_at=time.time()
                        )
                    )
            except IntegrityError:
                pass

    # ------------------------------------------------------------------ models

    def import_file(
        self,
        path: str | os.PathLike[str],
        *,
        name: str,
        format: ModelFormat,
        precision: Precision,
        version: int | None = None,
        inputs: list[TensorSpec] | tuple[TensorSpec, ...] | None = None,
        outputs: list[TensorSpec] | tuple[TensorSpec, ...] | None = None,
        param_count: int | None = None,
        flops: int | None = None,
        accuracy_fp32: float | None = None,
        accuracy_int8: float | None = None,
        eval_samples: int | None = None,
        calibration: dict[str, Any] | None = None,
        parent_version: int | None = None,
    ) -> ModelRecord:
        """Store a model file and register it as the next version of ``name``.

        Specs, parameter count and FLOPs are read from the file when not given (ONNX; TFLite
        specs when ``ai_edge_litert`` is installed); a file that does not parse as
        ``format`` is refused with ``ValueError`` (``torch`` files are not inspected).
        Returns the existing record when the same bytes are already registered under
        ``name``. ``version`` pins the number (``ConflictError`` if taken);
        ``parent_version`` must name an existing version of ``name``.
        """
        check_name(name)
        if format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}")
        if version is not None and version < 1:
            raise ValueError("version must be >= 1")
        info = ModelInfo()
        if inputs is None or outputs is None or param_count is None or flops is None:
            info = inspect_model(Path(path), format)
        digest, size = self.blobs.put_file(path)
        values: dict[str, Any] = {
            "name": name,
            "digest": digest,
            "size": size,
            "format": format,
            "precision": precision,
            "inputs": [s.to_dict() for s in (inputs if inputs is not None else info.inputs)],
            "outputs": [s.to_dict() for s in (outputs if outputs is not None else info.outputs)],
            "param_count": param_count if param_count is not None else info.param_count,
            "flops": flops if flops is not None else info.flops,
            "accuracy_fp32": accuracy_fp32,
            "accuracy_int8": accuracy_int8,
            "eval_samples": eval_samples,
            "calibration": calibration,
            "parent_version": parent_version,
        }
        for _ in range(_VERSION_RETRIES):
            try:
                with self.engine.begin() as conn:
                    self._record_blob(conn, digest, size)
                    existing = self._select_one(conn, name=name, digest=digest)
                    if existing is not None:
                        return existing
                    if (
                        parent_version is not None
                        and self._select_one(conn, name=name, version=parent_version) is None
                    ):
                        raise NotFoundError("model", f"{name}@{parent_version}")
                    number = version if version is not None else self._next_version(conn, name)
                    conn.execute(
                        insert(tables.model_versions).values(
                            **values, version=number, created_at=time.time()
                        )
                    )
                    record = self._select_one(conn, name=name, version=number)
                    assert record is not None
                    return record
            except IntegrityError as exc:
                # Another importer took this version number (or registered these bytes)
                # between our read and our insert: read again and retry.
                if version is not None:
                    with self.engine.connect() as conn:
                        existing = self._select_one(conn, name=name, digest=digest)
                    if existing is not None:
                        return existing
                    raise ConflictError(
                        "model", f"{name}@{version}", "version already taken"
                    ) from exc
        raise ConflictError("model", name, "could not allocate a version number")

    def import_bytes(self, data: bytes, *, suffix: str = "", **kwargs: Any) -> ModelRecord:
        """:meth:`import_file` for bytes in memory (written to a temp file first)."""
        with tempfile.TemporaryDirectory(prefix="lepton-import-") as tmp:
            path = Path(tmp) / f"model{suffix}"
            path.write_bytes(data)
            return self.import_file(path, **kwargs)

    def get(
        self,
        name: str,
        version: int | None = None,
        *,
        precision: Precision | None = None,
        format: ModelFormat | None = None,
    ) -> ModelRecord:
        """A version of ``name`` (the latest matching ``precision``/``format`` when None).

        Raises :class:`NotFoundError` when nothing matches.
        """
        with self.engine.connect() as conn:
            if version is not None:
                rec = self._select_one(conn, name=name, version=version)
                if (
                    rec is None
                    or (precision and rec.precision != precision)
                    or (format and rec.format != format)
                ):
                    raise NotFoundError("model", f"{name}@{version}")
                return rec
            t = tables.model_versions
            cond = [t.c.name == name]
            if precision:
                cond.append(t.c.precision == precision)
            if format:
                cond.append(t.c.format == format)
            row = (
                conn.execute(select(t).where(and_(*cond)).order_by(t.c.version.desc()).limit(1))
                .mappings()
                .first()
            )
        if row is None:
            raise NotFoundError("model", name)
        return ModelRecord.from_row(row)

    def by_digest(self, digest: str) -> ModelRecord:
        """The first-registered version whose bytes have this digest (``NotFoundError`` if none)."""
        check_digest(digest)
        t = tables.model_versions
        with self.engine.connect() as conn:
            row = (
                conn.execute(select(t).where(t.c.digest == digest).order_by(t.c.id).limit(1))
                .mappings()
                .first()
            )
        if row is None:
            raise NotFoundError("model digest", digest)
        return ModelRecord.from_row(row)

    def list(self, name: str | None = None) -> builtins.list[ModelRecord]:
        """Every version (of ``name`` when given), ordered by name then version."""
        t = tables.model_versions
        query = select(t).order_by(t.c.name, t.c.version)
        if name is not None:
            query = query.where(t.c.name == name)
        with self.engine.connect() as conn:
            return [ModelRecord.from_row(r) for r in conn.execute(query).mappings()]

    def names(self) -> builtins.list[str]:
        """The registered model names, sorted."""
        t = tables.model_versions
        with self.engine.connect() as conn:
            return list(conn.execute(select(t.c.name).distinct().order_by(t.c.name)).scalars())

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _select_one(conn: Connection, **where: Any) -> ModelRecord | None:
        t = tables.model_versions
        query = select(t).where(and_(*(t.c[k] == v for k, v in where.items())))
        row = conn.execute(query).mappings().first()
        return ModelRecord.from_row(row) if row is not None else None

    @staticmethod
    def _next_version(conn: Connection, name: str) -> int:
        t = tables.model_versions
        current = conn.execute(select(func.max(t.c.version)).where(t.c.name == name)).scalar()
        return int(current or 0) + 1
