from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.broker import Broker, mosquitto_binary


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    """Start real mosquitto brokers with a config the test chooses; all stopped at the end."""
    if mosquitto_binary() is None:
        pytest.fail("mosquitto binary not found; scripts/test installs it")
    started: list[Broker] = []

    def make(extra_config: str = "", *, start: bool = True) -> Broker:
        workdir = tmp_path / f"broker{len(started)}"
        workdir.mkdir()
        b = Broker(workdir=workdir, extra_config=extra_config)
        started.append(b)
        if start:
            b.start()
        return b

    yield make
    for b in started:
        b.kill()


@pytest.fixture
def broker(broker_factory: Callable[..., Broker]) -> Broker:
    """A fresh anonymous broker on a free port."""
    return broker_factory()
