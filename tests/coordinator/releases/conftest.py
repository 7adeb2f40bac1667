"""A running coordinator that trusts a fresh release root, and bundles signed for it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from lepton.coordinator.service import Coordinator
from tests.support.release_bundles import Trust

MakeCoordinator = Callable[..., contextlib.AbstractAsyncContextManager[Coordinator]]


@pytest.fixture
def trust() -> Trust:
    return Trust()


@pytest.fixture
def root_file(trust: Trust, tmp_path: Path) -> Path:
    return trust.write_root(tmp_path / "release-root.json")


@pytest.fixture
async def releasing(
    make_coordinator: MakeCoordinator, root_file: Path
) -> AsyncIterator[Coordinator]:
    """A coordinator with ``[releases] root_file`` set, bundles capped at 1 MiB."""
    overrides: dict[str, Any] = {
        "releases__root_file": str(root_file),
        "releases__max_bundle_bytes": 1 << 20,
    }
    async with make_coordinator(**overrides) as c:
        yield c
