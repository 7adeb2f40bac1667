"""Named local data sources: data that stays on the device and that tasks refer to by name.

The agent config's ``[data]`` table names them (``digits = "/srv/data/digits.npz"``). A source
is one of:

- ``*.npz``: arrays ``x`` and, optionally, labels ``y``;
- ``*.npy``: ``x`` only (memory-mapped, so a ``limit`` reads only what it needs);
- a folder of images, one sub-folder per class (labels are the sorted class folders'
  indices); images directly in the folder have no labels. Decoding needs Pillow;
- ``package.module:function``: a plugin returning ``(x, y)``, ``(x, None)`` or ``x``, or a
  map-style dataset (a ``torch.utils.data.Dataset`` or anything with ``__len__`` and
  ``__getitem__``) whose items are ``(x, y)`` samples; its samples are read once (up to the
  task's limit) and stacked into arrays.

Nothing is unpickled: ``.npz``/``.npy`` files are read with ``allow_pickle=False``.

:class:`DataSources` remembers the sample count of each source it loaded (the full count,
also when a task's ``limit`` read fewer), so capacity reports can say how much data a device
holds without loading anything at start-up.
"""

from __future__ import annotations

import abc
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from lepton.agent.inference.runtimes.base import Array
from lepton.common.errors import LeptonError

IMAGE_SUFFIXES: Final = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".pgm", ".ppm", ".tif", ".tiff"}
)
_PLUGIN_RE: Final = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


class DataSourceError(LeptonError):
    """A data source is unknown, missing, unreadable or holds unusable arrays."""


@dataclass(frozen=True, slots=True)
class Dataset:
    """Samples ``x`` (first axis: samples) and optional labels ``y`` (class ids or one-hot).

    ``total``: the samples the source holds, before a ``limit`` cut it to ``len(x)``; None
    when a cut load cannot tell (labels and samples not known to be as many).
    """

    x: Array
    y: Array | None = None
    classes: tuple[str, ...] = field(default=())
    total: int | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])


def _checked(x: Any, y: Any, where: str, limit: int | None, total: int | None = None) -> Dataset:
    """Validated arrays, cut to ``limit`` samples. ``total``: the source's sample count when
    the caller cut ``x`` already (else it is read from ``x`` and ``y`` before the cut)."""
    import numpy as np

    x = np.asarray(x)
    if x.ndim < 1 or x.dtype.kind not in "biuf":
        raise DataSourceError(f"{where}: x must be a numeric array with a sample axis")
    if total is None and (y is None or len(y) == len(x)):
        total = len(x)  # a length mismatch past the cut is never read, so nothing is known
    if limit is not None:
        x = x[:limit]
    x = np.ascontiguousarray(x)
    if y is not None:
        y = np.asarray(y)
        if y.ndim not in (1, 2) or y.dtype.kind not in "biuf":
            raise DataSourceError(f"{where}: y must be class ids (1-D) or one-hot (2-D)")
        if limit is not None:
            y = y[:limit]
        if len(y) != len(x):
            raise DataSourceError(f"{where}: {len(x)} samples but {len(y)} labels")
        y = np.ascontiguousarray(y)
    return Dataset(x=x, y=y, total=total)


class DataSource(abc.ABC):
    """Where one named data set comes from."""

    @abc.abstractmethod
    def load(self, limit: int | None = None) -> Dataset:
        """Read the data (at most ``limit`` samples); raises :class:`DataSourceError`."""

    @property
    @abc.abstractmethod
    def description(self) -> str: ...


class ArraySource(DataSource):
    """Arrays already in memory (the reference implementation and test double)."""

    def __init__(self, x: Array, y: Array | None = None) -> None:
        self._x, self._y = x, y

    def load(self, limit: int | None = None) -> Dataset:
        return _checked(self._x, self._y, "arrays", limit)

    @property
    def description(self) -> str:
        return "arrays in memory"


class NpzSource(DataSource):
    """``x`` and optional ``y`` from a ``.npz`` file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self, limit: int | None = None) -> Dataset:
        import numpy as np

        try:
            with np.load(self.path, allow_pickle=False) as npz:
                files = list(npz.files)
                x = npz["x"] if "x" in files else None
                y = npz["y"] if "y" in files else None
        except (OSError, ValueError) as exc:  # missing file, bad zip, pickled objects
            raise DataSourceError(f"{self.path}: cannot read: {exc}") from exc
        if x is None:
            raise DataSourceError(f"{self.path}: no array named 'x' (has {files})")
        return _checked(x, y, str(self.path), limit)

    @property
    def description(self) -> str:
        return f"npz {self.path}"


class NpySource(DataSource):
    """``x`` only, from a ``.npy`` file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self, limit: int | None = None) -> Dataset:
        import numpy as np

        try:
            x = np.load(self.path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataSourceError(f"{self.path}: cannot read: {exc}") from exc
        return _checked(x, None, str(self.path), limit)

    @property
    def description(self) -> str:
        return f"npy {self.path}"


class ImageFolderSource(DataSource):
    """Images under ``root``; one sub-folder per class, labelled by sorted folder index."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _files(self) -> tuple[list[tuple[Path, int]], tuple[str, ...]]:
        classes = tuple(sorted(p.name for p in self.root.iterdir() if p.is_dir()))
        files: list[tuple[Path, int]] = []
        if classes:
            for label, name in enumerate(classes):
                files += [
                    (p, label)
                    for p in sorted((self.root / name).iterdir())
                    if p.suffix.lower() in IMAGE_SUFFIXES
                ]
        else:
            files = [
                (p, -1) for p in sorted(self.root.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES
            ]
        return files, classes

    def load(self, limit: int | None = None) -> Dataset:
        import numpy as np

        try:
            from PIL import Image
        except ImportError as exc:
            raise DataSourceError(
                f"{self.root}: image folders need Pillow (pip install pillow)"
            ) from exc
        files, classes = self._files()
        if not files:
            raise DataSourceError(f"{self.root}: no images found")
        total = len(files)
        if limit is not None:
            files = files[:limit]
        images: list[Array] = []
        for path, _ in files:
            try:
                with Image.open(path) as img:
                    arr = np.asarray(img if img.mode == "L" else img.convert("RGB"))
            except OSError as exc:
                raise DataSourceError(f"{path}: cannot decode: {exc}") from exc
            if images and arr.shape != images[0].shape:
                raise DataSourceError(
                    f"{path}: shape {arr.shape} differs from {images[0].shape} of {files[0][0]}"
                )
            images.append(arr)
        y = np.array([label for _, label in files], dtype=np.int64) if classes else None
        data = _checked(np.stack(images), y, str(self.root), None, total)
        return Dataset(x=data.x, y=data.y, classes=classes, total=total)

    @property
    def description(self) -> str:
        return f"images {self.root}"


def _is_map_dataset(value: Any) -> bool:
    """A map-style dataset (``torch.utils.data.Dataset`` and the like), not an array."""
    import numpy as np

    return (
        hasattr(value, "__getitem__")
        and hasattr(value, "__len__")
        and not isinstance(value, (np.ndarray, list, tuple, dict, str, bytes))
        and not hasattr(value, "__array__")
    )


def _stacked(dataset: Any, where: str, limit: int | None) -> tuple[Array, Array]:
    """The samples of a map-style dataset of ``(x, y)`` items as two stacked arrays."""
    import numpy as np

    n = len(dataset)
    if limit is not None:
        n = min(n, limit)
    if n == 0:
        raise DataSourceError(f"{where}: the dataset is empty")
    xs: list[Array] = []
    ys: list[Array] = []
    for i in range(n):
        try:
            item = dataset[i]
        except Exception as exc:  # the dataset is the user's code: report, never crash
            raise DataSourceError(f"{where}: item {i} failed: {type(exc).__name__}: {exc}") from exc
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise DataSourceError(f"{where}: item {i} is not an (x, y) pair")
        x, y = (np.asarray(v) for v in item)
        if xs and x.shape != xs[0].shape:
            raise DataSourceError(f"{where}: item {i} has shape {x.shape}, item 0 {xs[0].shape}")
        if y.ndim > 1 or (ys and y.shape != ys[0].shape):
            raise DataSourceError(f"{where}: item {i} has a label of shape {y.shape}")
        xs.append(x)
        ys.append(y)
    return np.stack(xs), np.stack(ys)


class PluginSource(DataSource):
    """``module:function`` returning ``(x, y)``, ``(x, None)``, ``x`` or a map-style dataset."""

    def __init__(self, target: str) -> None:
        self.target = target

    def _function(self) -> Callable[[], Any]:
        from lepton.protocol.imports import Allowlist, ImportPathError, resolve

        try:
            # The device's own config names its data sources: the operator wrote it.
            return resolve(self.target, allow=Allowlist.anything())
        except ImportPathError as exc:
            raise DataSourceError(f"plugin {self.target}: {exc}") from exc

    def load(self, limit: int | None = None) -> Dataset:
        func = self._function()
        try:
            value = func()
        except Exception as exc:  # the plugin is the user's code: report, never crash
            raise DataSourceError(
                f"plugin {self.target} failed: {type(exc).__name__}: {exc}"
            ) from exc
        total: int | None = None
        if _is_map_dataset(value):
            x, y = _stacked(value, f"plugin {self.target}", limit)
            total = len(value)
        elif isinstance(value, tuple):
            if len(value) != 2:
                raise DataSourceError(f"plugin {self.target}: must return (x, y) or x")
            x, y = value
        else:
            x, y = value, None
        return _checked(x, y, f"plugin {self.target}", limit, total)

    @property
    def description(self) -> str:
        return f"plugin {self.target}"


def source_for(spec: str) -> DataSource:
    """The source a config value names: a plugin ``module:function``, else a path."""
    path = Path(spec).expanduser()
    if _PLUGIN_RE.fullmatch(spec) and not path.exists():
        return PluginSource(spec)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return NpzSource(path)
    if suffix == ".npy":
        return NpySource(path)
    if path.is_dir():
        return ImageFolderSource(path)
    if not path.exists():
        raise DataSourceError(f"data source {spec!r} does not exist")
    raise DataSourceError(
        f"data source {spec!r}: expected .npz, .npy, an image folder or module:function"
    )


class DataSources:
    """The device's named sources, from ``[data]``; extra sources can be added in code.

    Loads through :meth:`load` record each source's sample count (:meth:`sizes`).
    """

    def __init__(self, specs: Mapping[str, str] | None = None) -> None:
        self._specs = dict(specs or {})
        self._extra: dict[str, DataSource] = {}
        self._sizes: dict[str, int] = {}
        self._lock = threading.Lock()  # loads run in worker threads; reports read sizes

    def add(self, name: str, source: DataSource) -> None:
        self._extra[name] = source
        with self._lock:
            self._sizes.pop(name, None)  # another source under the name: size unknown

    def names(self) -> list[str]:
        return sorted({*self._specs, *self._extra})

    def get(self, name: str) -> DataSource:
        if name in self._extra:
            return self._extra[name]
        spec = self._specs.get(name)
        if spec is None:
            known = ", ".join(self.names()) or "none configured"
            raise DataSourceError(f"unknown data source {name!r} (known: {known})")
        return source_for(spec)

    def load(self, name: str, limit: int | None = None) -> Dataset:
        """Load the source ``name`` (at most ``limit`` samples) and remember how many
        samples it holds; a source that fails to load has no known size any more."""
        try:
            data = self.get(name).load(limit)
        except DataSourceError:
            with self._lock:
                self._sizes.pop(name, None)
            raise
        with self._lock:
            if data.total is not None:
                self._sizes[name] = data.total
            elif limit is None or len(data) < limit:
                self._sizes[name] = len(data)  # nothing was cut: all of it is here
        return data

    def sizes(self) -> dict[str, int]:
        """Sample count of each source loaded so far (its latest load), by name."""
        with self._lock:
            return dict(self._sizes)
