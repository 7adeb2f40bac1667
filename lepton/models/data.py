"""The digits data set (sklearn's bundled 8x8 digits): deterministic splits, label-skewed
partitions for federated clients, and .npz files a device reads its partition from.

Images are float32 ``[N, 1, 8, 8]`` scaled to ``[0, 1]`` (sklearn stores 0..16); labels int64.
Every split is a pure function of its seed, so the coordinator, the tests and the shipped
artifacts all see the same samples.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

N_CLASSES = 10
IMAGE_SHAPE = (1, 8, 8)
TEST_FRACTION = 0.25
CALIBRATION_SIZE = 256
SPLIT_SEED = 0


@dataclass(frozen=True, slots=True)
class Split:
    """Images ``x`` (float32 ``[N, 1, 8, 8]`` in ``[0, 1]``) and labels ``y`` (int64 ``[N]``)."""

    x: FloatArray
    y: IntArray

    def __len__(self) -> int:
        return len(self.y)

    def batches(self, batch_size: int) -> list[FloatArray]:
        """The images in order, cut into batches of at most ``batch_size``."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        return [self.x[i : i + batch_size] for i in range(0, len(self.x), batch_size)]


@dataclass(frozen=True, slots=True)
class DigitsSplits:
    """Disjoint train and test splits; ``calibration`` is a class-balanced subset of train."""

    train: Split
    test: Split
    calibration: Split


def load_digits_arrays() -> tuple[FloatArray, IntArray]:
    """All 1,797 digits as ``(x, y)``; needs scikit-learn (its bundled copy, no download)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (np.asarray(bunch.images, dtype=np.float32) / 16.0).reshape(-1, *IMAGE_SHAPE)
    y = np.asarray(bunch.target, dtype=np.int64)
    return x, y


def digits_splits(
    *,
    seed: int = SPLIT_SEED,
    test_fraction: float = TEST_FRACTION,
    calibration_size: int = CALIBRATION_SIZE,
) -> DigitsSplits:
    """Stratified train/test split and a stratified calibration subset of the training data.

    Calibration samples come from training data, never from the test set the accuracy gate
    is measured on.
    """
    from sklearn.model_selection import train_test_split

    x, y = load_digits_arrays()
    idx = np.arange(len(y))
    train_idx, test_idx = train_test_split(
        idx, test_size=test_fraction, random_state=seed, stratify=y
    )
    calib_idx, _ = train_test_split(
        train_idx, train_size=calibration_size, random_state=seed, stratify=y[train_idx]
    )
    train_idx, test_idx, calib_idx = np.sort(train_idx), np.sort(test_idx), np.sort(calib_idx)
    return DigitsSplits(
        train=Split(x[train_idx], y[train_idx]),
        test=Split(x[test_idx], y[test_idx]),
        calibration=Split(x[calib_idx], y[calib_idx]),
    )


def dirichlet_partition(
    labels: npt.ArrayLike,
    n_clients: int,
    alpha: float,
    seed: int,
    *,
    min_size: int = 1,
    max_tries: int = 1000,
) -> list[npt.NDArray[np.int64]]:
    """Split sample indices among ``n_clients`` with label skew drawn from ``Dir(alpha)``.

    For each class, the class's samples are shuffled and dealt out in proportions drawn from
    a symmetric Dirichlet distribution: small ``alpha`` (0.1) gives each client few classes,
    large ``alpha`` (100) approaches an IID split. Every sample goes to exactly one client.
    Draws are repeated (up to ``max_tries``) until every client holds at least ``min_size``
    samples; ``ValueError`` if that never happens or cannot happen. The result is a sorted
    index array per client and depends only on the arguments.
    """
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError("labels must be one-dimensional")
    if n_clients < 1:
        raise ValueError("n_clients must be >= 1")
    if not alpha > 0:
        raise ValueError("alpha must be > 0")
    if min_size * n_clients > len(y):
        raise ValueError(f"{len(y)} samples cannot give {n_clients} clients {min_size} each")
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    if not len(classes):
        return [np.empty(0, dtype=np.int64) for _ in range(n_clients)]
    for _ in range(max_tries):
        parts: list[list[npt.NDArray[np.int64]]] = [[] for _ in range(n_clients)]
        for cls in classes:
            members = rng.permutation(np.flatnonzero(y == cls)).astype(np.int64)
            shares = rng.dirichlet(np.full(n_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].append(chunk)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in out) >= min_size:
            return out
    raise ValueError(
        f"no partition gave every client {min_size} samples in {max_tries} draws "
        f"(alpha={alpha}, n_clients={n_clients}); raise alpha or lower min_size"
    )


def save_npz(path: str | os.PathLike[str], x: npt.ArrayLike, y: npt.ArrayLike) -> Path:
    """Write ``x`` and ``y`` to a compressed .npz atomically (temp file, fsync, rename)."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez_compressed(fh, x=np.asarray(x), y=np.asarray(y))
            fh.flush()
            os.fsync(fh.fileno())
        Path(tmp).chmod(0o644)  # mkstemp creates 0600; this is a data file, not a secret
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def load_npz(path: str | os.PathLike[str]) -> Split:
    """Read an .npz written by :func:`save_npz` (no pickled objects are accepted)."""
    with np.load(path, allow_pickle=False) as data:
        return Split(np.asarray(data["x"], dtype=np.float32), np.asarray(data["y"], np.int64))


def write_partition(path: str | os.PathLike[str], split: Split, indices: npt.ArrayLike) -> Path:
    """Write one device's partition (the samples at ``indices``) to ``path`` as .npz."""
    idx = np.asarray(indices, dtype=np.int64)
    return save_npz(path, split.x[idx], split.y[idx])
