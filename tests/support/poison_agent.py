"""``python -m tests.support.poison_agent run --config PATH``: the real agent daemon with one
more task kind, ``abort``, whose handler ends the process with ``os.abort()`` (as a native
crash or an out-of-memory kill would). For the poison-task quarantine tests."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import sys
from pathlib import Path
from typing import Any

from lepton.agent.config import load_config
from lepton.agent.daemon import Agent
from lepton.agent.handlers import TaskContext, default_registry
from lepton.protocol.messages import Task


async def abort(task: Task, ctx: TaskContext) -> dict[str, Any]:
    """Kill the agent mid-task."""
    logging.getLogger(__name__).warning("task %s aborts the process", task.task_id)
    os.abort()


async def _run(config_path: Path) -> None:
    config = load_config(config_path, env={})
    registry = default_registry()
    registry.register("abort", abort)
    async with Agent(config, registry=registry) as agent:
        await agent.run(install_signal_handlers=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["run"])
    parser.add_argument("--config", type=Path, required=True)
    ns = parser.parse_args()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core files in the checkout
    logging.basicConfig(level="INFO", stream=sys.stderr)
    asyncio.run(_run(ns.config))


if __name__ == "__main__":
    main()
