"""lepton.protocol.aio.cancel_and_wait: tasks that lose a cancel still end."""

from __future__ import annotations

import asyncio
import contextlib

from lepton.protocol.aio import cancel_and_wait


async def _loses_one_cancel() -> None:
    """A loop whose wait returns instead of raising on a cancel (as Python 3.11's
    ``asyncio.wait_for`` does when its future completes as the cancel arrives), then waits
    again."""
    with contextlib.suppress(asyncio.CancelledError):  # the cancel is spent
        await asyncio.sleep(10)
    await asyncio.Event().wait()


async def test_a_task_that_loses_its_cancel_is_cancelled_again() -> None:
    task = asyncio.create_task(_loses_one_cancel())
    await asyncio.sleep(0)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=0.3)
    assert not done  # one cancel is not enough for it
    async with asyncio.timeout(5):
        await cancel_and_wait([task], every=0.05)
    assert task.cancelled()


async def test_errors_are_left_on_the_tasks_and_done_tasks_are_skipped() -> None:
    async def fails_on_cancel() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            raise RuntimeError("cleanup failed") from None

    async def quick() -> int:
        return 7

    failing = asyncio.create_task(fails_on_cancel())
    finished = asyncio.create_task(quick())
    await asyncio.sleep(0)
    assert finished.done()
    await cancel_and_wait([failing, finished])
    assert isinstance(failing.exception(), RuntimeError)
    assert finished.result() == 7
