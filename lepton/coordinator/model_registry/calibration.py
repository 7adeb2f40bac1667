"""Calibration data for static quantization: the ``DataSource`` plugin interface.

A data source is either an iterable of batches or a zero-argument callable returning one
(called once per pass, so it may be re-read). A batch is an array for single-input models or
a mapping of input name to array. :func:`load_source` turns a command-line spec into a
source: ``PATH.npz`` (its ``x`` array, cut into batches) or ``package.module:attr`` (an
iterable, or a callable returning one, found by import).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from onnxruntime.quantization import CalibrationDataReader

Batch = npt.NDArray[Any] | Mapping[str, npt.NDArray[Any]]
DataSource = Iterable[Batch] | Callable[[], Iterable[Batch]]


def iter_source(source: DataSource) -> Iterator[Batch]:
    """A fresh iterator over the source's batches."""
    if callable(source):
        return iter(source())
    return iter(source)


class SourceReader(CalibrationDataReader):  # type: ignore[misc]  # untyped ORT base class
    """Feeds a data source to ``quantize_static``, counting what it handed out.

    Arrays are fed to ``input_name`` as float32; mappings are fed as given. At most
    ``max_batches`` source batches are read when it is set. With ``single_samples`` each
    batch is fed one sample at a time (every feed then has the same shape).
    """

    def __init__(
        self,
        source: DataSource,
        input_name: str,
        *,
        max_batches: int | None = None,
        single_samples: bool = False,
    ) -> None:
        self._source = source
        self._input_name = input_name
        self._max = max_batches
        self._single = single_samples
        self._it = iter_source(source)
        self._pending: list[dict[str, npt.NDArray[Any]]] = []
        self.batches = 0
        self.samples = 0

    def _feed(self, batch: Batch) -> dict[str, npt.NDArray[Any]]:
        if isinstance(batch, Mapping):
            return {k: np.ascontiguousarray(v) for k, v in batch.items()}
        return {self._input_name: np.ascontiguousarray(batch, dtype=np.float32)}

    def get_next(self) -> dict[str, npt.NDArray[Any]] | None:
        if self._pending:
            return self._pending.pop(0)
        if self._max is not None and self.batches >= self._max:
            return None
        batch = next(self._it, None)
        if batch is None:
            return None
        feed = self._feed(batch)
        n = int(next(iter(feed.values())).shape[0])
        self.batches += 1
        self.samples += n
        if not self._single:
            return feed
        self._pending = [{k: v[i : i + 1] for k, v in feed.items()} for i in range(n)]
        return self._pending.pop(0) if self._pending else self.get_next()

    def rewind(self) -> None:
        self._it = iter_source(self._source)
        self._pending = []
        self.batches = 0
        self.samples = 0


def npz_batches(
    path: str | Path, *, key: str = "x", batch_size: int = 32
) -> list[npt.NDArray[Any]]:
    """The ``key`` array of an .npz file cut into batches (no pickled objects accepted)."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    with np.load(path, allow_pickle=False) as data:
        x = np.asarray(data[key])
    return [x[i : i + batch_size] for i in range(0, len(x), batch_size)]


def load_source(spec: str, *, batch_size: int = 32) -> DataSource:
    """Resolve a command-line data source spec (see the module docstring)."""
    if spec.endswith(".npz"):
        return npz_batches(spec, batch_size=batch_size)
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"data source {spec!r} is neither a .npz path nor module:attr")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj) and not isinstance(obj, Iterable):
        raise TypeError(f"data source {spec!r} is neither iterable nor callable")
    source: DataSource = obj
    return source


def load_eval_set(path: str | Path) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """``(x, y)`` from an .npz evaluation set."""
    with np.load(path, allow_pickle=False) as data:
        return np.asarray(data["x"]), np.asarray(data["y"])
