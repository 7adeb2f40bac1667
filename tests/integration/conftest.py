from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lepton.coordinator.service import Coordinator

# The coordinator fixtures (a running service on a real broker) are shared with these tests.
from tests.coordinator.conftest import coordinator, make_coordinator
from tests.support.agents import AgentProcess, Enrol, write_agent_config
from tests.support.api import endpoint, stored_claim

__all__ = ["agents", "coordinator", "make_coordinator"]

StartAgent = Callable[..., AgentProcess]


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[StartAgent]:
    """Start real agent processes: ``agents(broker_port, device_id, **config_sections)``
    (two task slots unless ``agent=`` says otherwise); every one is killed at the end. With
    ``coordinator=c`` (a running :class:`Coordinator`), each enrols with ``c`` first (a claim
    of its own made on ``c``'s database) and runs with its own identity and HTTP token."""
    started: list[AgentProcess] = []

    def start(
        port: int, device_id: str, *, coordinator: Coordinator | None = None, **sections: Any
    ) -> AgentProcess:
        cfg = write_agent_config(
            tmp_path / f"{device_id}.toml",
            device_id=device_id,
            port=port,
            state_dir=tmp_path / device_id,
            **{"agent": {"slots": 2}, **sections},
        )
        enrol = None
        if coordinator is not None:
            url = endpoint(coordinator).url
            enrol = Enrol(url, stored_claim(coordinator), tmp_path / device_id)
        proc = AgentProcess(config_path=cfg, log_path=tmp_path / f"{device_id}.log", enrol=enrol)
        proc.start()
        started.append(proc)
        return proc

    yield start
    for p in started:
        p.kill()
