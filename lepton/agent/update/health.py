"""The trial gate: what a new agent image must show before it is committed.

Healthy = connected to the broker, the first capacity report published, and (where the
image's manifest has a ``self_test``) the bundle's model, loaded with this agent's ONNX
Runtime, labels the reference inputs as expected for at least ``min_agreement`` of them.
:meth:`~lepton.agent.update.updater.Updater.trial` waits for these until the trial's deadline;
the daemon (:mod:`lepton.agent.daemon`) exits non-zero when they do not come, so the boot step
(a crash loop) or the deadline rolls the device back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lepton.common.errors import LeptonError

if TYPE_CHECKING:
    from lepton.protocol.releases import SelfTest

#: The daemon's exit status when a trial did not become healthy before its deadline.
EXIT_UNHEALTHY = 70
#: The daemon's exit status when it stops so that another image starts (``Restart=on-failure``
#: starts it again, through the boot step).
EXIT_RESTART = 75


class UnhealthyError(LeptonError):
    """The image on trial did not pass its checks; ``reason`` is the first that failed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthChecks:
    """What the daemon exposes to the trial gate: events it sets as it comes up, and how to
    make an inference runtime for the self-test."""

    connected: asyncio.Event
    first_report: asyncio.Event
    providers: Sequence[str] = ()


def run_self_test(bundle: Path, test: SelfTest, *, providers: Sequence[str] = ()) -> None:
    """Run the manifest's self-test on this device; :class:`UnhealthyError` when it fails.

    Heavy imports (numpy, onnxruntime) happen here, only on a device whose image has one.
    """
    try:
        import numpy as np

        from lepton.agent.inference.runtimes.onnx import OnnxRuntime
    except ImportError as exc:
        raise UnhealthyError(f"self_test: no runtime ({exc.name})") from exc
    try:
        x = np.load(bundle / test.inputs)["x"]
        y = np.load(bundle / test.expected)["y"]
        runtime = OnnxRuntime(providers=tuple(providers))
        runtime.load(bundle / test.model, threads=1)
        try:
            name_in = runtime.inputs[0].name
            name_out = runtime.outputs[0].name
            out = runtime.run({name_in: x.astype(np.float32)})[name_out]
        finally:
            runtime.close()
    except UnhealthyError:
        raise
    except Exception as exc:  # any model/input problem is a failed self-test
        raise UnhealthyError(f"self_test: {type(exc).__name__}: {str(exc)[:120]}") from exc
    labels = out.argmax(axis=-1) if out.ndim > 1 else out
    if len(labels) != len(y) or len(y) == 0:
        raise UnhealthyError(f"self_test: {len(labels)} outputs for {len(y)} expected labels")
    agreement = float((labels.reshape(-1) == y.reshape(-1)).mean())
    if agreement < test.min_agreement:
        raise UnhealthyError(f"self_test: agreement {agreement:.3f} < {test.min_agreement}")


async def wait_healthy(
    checks: HealthChecks,
    *,
    bundle: Path,
    test: SelfTest | None,
    timeout: float,
) -> None:
    """Wait for the checks, at most ``timeout`` seconds; :class:`UnhealthyError` names the first
    that did not pass."""
    loop = asyncio.get_running_loop()
    end = loop.time() + max(timeout, 0.0)
    for name, event in (
        ("broker_unreachable", checks.connected),
        ("no_capacity_report", checks.first_report),
    ):
        try:
            async with asyncio.timeout_at(end):
                await event.wait()
        except TimeoutError:
            raise UnhealthyError(name) from None
    if test is not None:
        await asyncio.to_thread(run_self_test, bundle, test, providers=checks.providers)
