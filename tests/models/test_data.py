from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lepton.models.data import (
    N_CLASSES,
    DigitsSplits,
    digits_splits,
    dirichlet_partition,
    load_npz,
    save_npz,
    write_partition,
)


def test_splits_are_deterministic_disjoint_and_scaled(splits: DigitsSplits) -> None:
    again = digits_splits()
    np.testing.assert_array_equal(splits.test.x, again.test.x)
    np.testing.assert_array_equal(splits.calibration.y, again.calibration.y)
    assert len(splits.train) + len(splits.test) == 1797
    assert len(splits.calibration) == 256
    assert splits.train.x.dtype == np.float32
    assert splits.train.x.shape[1:] == (1, 8, 8)
    assert splits.train.x.min() >= 0.0
    assert splits.train.x.max() <= 1.0
    # Calibration rows come from the training split, never from the test split.
    train_rows = {r.tobytes() for r in splits.train.x}
    assert all(r.tobytes() in train_rows for r in splits.calibration.x)
    assert set(np.unique(splits.test.y)) == set(range(N_CLASSES))


def test_dirichlet_partition_covers_every_sample_once() -> None:
    labels = np.repeat(np.arange(10), 50)
    parts = dirichlet_partition(labels, 7, 0.5, seed=3)
    assert len(parts) == 7
    joined = np.sort(np.concatenate(parts))
    np.testing.assert_array_equal(joined, np.arange(len(labels)))
    assert all(len(p) >= 1 for p in parts)
    again = dirichlet_partition(labels, 7, 0.5, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_dirichlet_alpha_controls_label_skew() -> None:
    labels = np.repeat(np.arange(10), 200)

    def mean_classes(alpha: float) -> float:
        parts = dirichlet_partition(labels, 10, alpha, seed=0)
        # Classes holding at least 5 % of a client's data.
        counts = [np.bincount(labels[p], minlength=10) / max(len(p), 1) for p in parts]
        return float(np.mean([(c >= 0.05).sum() for c in counts]))

    assert mean_classes(0.05) < 4 < 9 < mean_classes(100.0)


def test_dirichlet_min_size_and_bad_arguments() -> None:
    labels = np.repeat(np.arange(10), 20)
    parts = dirichlet_partition(labels, 5, 0.1, seed=1, min_size=10)
    assert min(len(p) for p in parts) >= 10
    with pytest.raises(ValueError, match="cannot give"):
        dirichlet_partition(labels, 300, 1.0, seed=0)
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_partition(labels, 3, 0.0, seed=0)
    with pytest.raises(ValueError, match="no partition"):
        dirichlet_partition(labels, 20, 0.01, seed=0, min_size=10, max_tries=3)


def test_partition_npz_round_trip(splits: DigitsSplits, tmp_path: Path) -> None:
    parts = dirichlet_partition(splits.train.y, 4, 1.0, seed=0)
    path = write_partition(tmp_path / "dev" / "part0.npz", splits.train, parts[0])
    got = load_npz(path)
    np.testing.assert_array_equal(got.x, splits.train.x[parts[0]])
    np.testing.assert_array_equal(got.y, splits.train.y[parts[0]])
    save_npz(path, got.x[:3], got.y[:3])  # overwrite atomically
    assert len(load_npz(path)) == 3
    assert [p.name for p in path.parent.iterdir()] == ["part0.npz"]  # no temp files left
