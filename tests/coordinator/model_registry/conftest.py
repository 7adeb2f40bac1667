"""Registries on SQLite (always) and PostgreSQL (when it answers), and the shipped digits data."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine

from lepton.coordinator.model_registry.registry import ModelRegistry
from lepton.models.data import Split, load_npz

ARTIFACTS = Path(__file__).resolve().parents[3] / "lepton" / "models" / "artifacts"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An engine on a fresh database: a SQLite file, or a PostgreSQL schema of its own
    (``pg_url`` from tests/coordinator/conftest.py creates it and drops it afterwards)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'registry.db'}"
    else:
        url = str(request.getfixturevalue("pg_url"))
    eng = create_engine(url)
    yield eng
    eng.dispose()


@pytest.fixture
def registry(engine: Engine, tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(engine, tmp_path / "data")


@pytest.fixture(scope="session")
def digits_test() -> Split:
    return load_npz(ARTIFACTS / "digits_test.npz")


@pytest.fixture(scope="session")
def digits_fp32() -> Path:
    return ARTIFACTS / "digits_fp32.onnx"
