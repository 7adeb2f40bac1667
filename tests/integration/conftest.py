from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# The coordinator fixtures (a running service on a real broker) are shared with these tests.
from tests.coordinator.conftest import coordinator, make_coordinator
from tests.support.agents import AgentProcess, write_agent_config

__all__ = ["agents", "coordinator", "make_coordinator"]

StartAgent = Callable[..., AgentProcess]


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[StartAgent]:
    """Start real agent processes: ``agents(broker_port, device_id, **config_sections)``
    (two task slots unless ``agent=`` says otherwise); every one is killed at the end."""
    started: list[AgentProcess] = []

    def start(port: int, device_id: str, **sections: Any) -> AgentProcess:
        cfg = write_agent_config(
            tmp_path / f"{device_id}.toml",
            device_id=device_id,
            port=port,
            state_dir=tmp_path / device_id,
            **{"agent": {"slots": 2}, **sections},
        )
        proc = AgentProcess(config_path=cfg, log_path=tmp_path / f"{device_id}.log")
        proc.start()
        started.append(proc)
        return proc

    yield start
    for p in started:
        p.kill()
