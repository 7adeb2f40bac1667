from __future__ import annotations

import asyncio
import faulthandler
import gc
import os
import sys
import threading
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest

from tests.support.broker import Broker, mosquitto_binary

# pytest-timeout (120 s, signal method) fails a slow test and goes on; a test whose teardown
# then blocks for good (a task that will not cancel, say) would stall the whole run until CI
# kills it, with nothing printed. Past this many seconds, every thread's stack is printed and
# the run ends.
HANG_S = float(os.environ.get("LEPTON_TEST_HANG_S", "420"))


def _dump_asyncio_tasks() -> None:
    """Where each task of every running event loop waits (read from another thread: good
    enough for a process about to end)."""
    for loop in [o for o in gc.get_objects() if isinstance(o, asyncio.AbstractEventLoop)]:
        if not loop.is_running():
            continue
        try:
            tasks = list(asyncio.all_tasks(loop))
        except RuntimeError:  # the set changed while read
            continue
        sys.stderr.write(f"\n+++ {len(tasks)} asyncio tasks +++\n")
        for task in tasks:
            sys.stderr.write(f"--- {task!r}\n")
            task.print_stack(limit=12, file=sys.stderr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, None, None]:
    done = threading.Event()

    def watch() -> None:
        if done.wait(HANG_S):
            return
        capman = item.config.pluginmanager.getplugin("capturemanager")
        if capman is not None:
            capman.suspend_global_capture(in_=True)
        sys.stderr.write(f"\n+++ {item.nodeid} still running after {HANG_S:.0f} s: stacks +++\n")
        sys.stderr.flush()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        _dump_asyncio_tasks()
        sys.stderr.flush()
        os._exit(1)

    watcher = threading.Thread(target=watch, name="hang-watchdog", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()


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
