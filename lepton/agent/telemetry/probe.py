"""Start-up probe: what this device can run, and how fast.

The probe runs in a short-lived subprocess (``python -m lepton.agent.telemetry.measure``, see
:mod:`lepton.agent.telemetry.measure`) that imports the heavy runtimes (ONNX Runtime, numpy), times
two tiny matrix-multiply models shipped in ``agent/assets`` for about a second and prints one JSON
object. The daemon never imports numpy or onnxruntime itself for this, so its idle footprint stays
small, and a runtime that crashes on import (a wrong wheel for the CPU) takes down the probe, not
the agent.

:func:`load_probe` runs that subprocess from the daemon and caches its answer in
``<state_dir>/probe.json``, keyed by boot id, agent version, Python version and the installed
runtime versions, so a restart within one boot reuses the figures. A failing probe never stops
the agent: it yields a :class:`ProbeResult` without a benchmark and with the error recorded.

Device-node accelerators (Jetson GPU, Coral, Hailo) come from :mod:`lepton.agent.telemetry.board`,
which the capacity sampler also re-checks on its own, because an accelerator can be plugged in
later.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgspec

from lepton.agent.telemetry.board import device_accelerators, read_raw
from lepton.agent.telemetry.measure import DEFAULT_BUDGET_S, PROBE_VERSION, dist_version
from lepton.common.errors import LeptonError
from lepton.protocol.messages import Bench

logger = logging.getLogger(__name__)

CACHE_FILE: Final = "probe.json"

#: Distributions whose versions are part of the cache key (a runtime upgrade re-runs the probe).
_KEY_DISTRIBUTIONS: Final = (
    "onnxruntime",
    "onnxruntime-gpu",
    "ai-edge-litert",
    "tflite-runtime",
    "torch",
    "numpy",
)


class ProbeError(LeptonError):
    """The probe subprocess failed, timed out or printed something unusable."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeResult:
    """What the probe found. ``bench`` is None when no figure could be measured.

    ``error`` holds the reason when the probe failed (the agent runs on without figures);
    ``from_cache`` tells whether the figures were reused from ``probe.json``.
    """

    bench: Bench | None
    runtimes: tuple[str, ...] = ()
    accelerators: tuple[str, ...] = ()
    details: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    error: str | None = None
    from_cache: bool = False

    @property
    def ok(self) -> bool:
        """True when the probe ran and measured at least the FP32 figure."""
        return self.error is None and self.bench is not None


# ---------------------------------------------------------------- the daemon side


def _boot_id() -> str | None:
    raw = read_raw(Path("/proc/sys/kernel/random/boot_id"), 128)
    text = raw.decode(errors="replace").strip() if raw else ""
    return text or None


def cache_key(agent_version: str) -> dict[str, Any] | None:
    """The key cached figures must match to be reused; None where no boot id can be read.

    Without a boot id (not Linux) nothing is reused: the figures could predate a hardware
    change and re-measuring costs about a second.
    """
    boot_id = _boot_id()
    if boot_id is None:
        return None
    return {
        "probe_version": PROBE_VERSION,
        "boot_id": boot_id,
        "agent_version": agent_version,
        "python": f"{sys.implementation.name}-{platform.python_version()}",
        "packages": {name: dist_version(name) for name in _KEY_DISTRIBUTIONS},
    }


def _result_from_json(data: Any, *, from_cache: bool) -> ProbeResult:
    """Validate the probe's JSON answer; raises ProbeError on anything malformed."""
    if not isinstance(data, dict):
        raise ProbeError(f"probe answer is {type(data).__name__}, not an object")
    try:
        raw_bench = data.get("bench")
        bench = msgspec.convert(raw_bench, Bench) if raw_bench is not None else None
        runtimes = msgspec.convert(data.get("runtimes", []), list[str])
        accelerators = msgspec.convert(data.get("accelerators", []), list[str])
        details = msgspec.convert(data.get("details", {}), dict[str, Any])
    except msgspec.ValidationError as exc:
        raise ProbeError(f"probe answer is invalid: {exc}") from exc
    return ProbeResult(
        bench=bench,
        runtimes=tuple(runtimes),
        accelerators=tuple(accelerators),
        details=details,
        from_cache=from_cache,
    )


def _parse_cache(raw: bytes, key: dict[str, Any]) -> ProbeResult | None:
    """The cached result when its key matches; None when it is stale; ProbeError when broken."""
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ProbeError(f"not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ProbeError("not a JSON object")
    if data.get("key") != key:
        return None
    return _result_from_json(data.get("result"), from_cache=True)


def _read_cache(path: Path, key: dict[str, Any]) -> ProbeResult | None:
    try:
        cached = _parse_cache(path.read_bytes(), key)
    except FileNotFoundError:
        return None
    except (OSError, ProbeError) as exc:
        logger.warning("ignoring unusable probe cache %s: %s", path, exc)
        return None
    if cached is None:
        logger.info("probe cache %s is for another boot or version, probing again", path)
    return cached


def _write_cache(path: Path, key: dict[str, Any], answer: dict[str, Any]) -> None:
    """Write ``probe.json`` atomically (temp file + rename); a failure is logged, not raised."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = json.dumps({"key": key, "result": answer}, indent=1).encode()
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".probe-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(payload)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        logger.warning("could not write probe cache %s: %s", path, exc)


def _child_env() -> dict[str, str]:
    # The child must not talk to systemd in the agent's name.
    drop = {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID"}
    return {k: v for k, v in os.environ.items() if k not in drop}


async def _run_subprocess(limit_s: float, budget_s: float) -> dict[str, Any]:
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "lepton.agent.telemetry.measure",
            "--budget",
            str(budget_s),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=_child_env(),
        )
    except OSError as exc:
        raise ProbeError(f"could not start the probe ({sys.executable}): {exc}") from exc
    try:
        async with asyncio.timeout(limit_s):
            stdout, stderr = await proc.communicate()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise ProbeError(f"probe did not finish within {limit_s:g} s; killed") from None
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    err_tail = stderr.decode(errors="replace").strip()[-2000:]
    if proc.returncode != 0:
        raise ProbeError(f"probe exited with status {proc.returncode}: {err_tail or 'no output'}")
    lines = [ln for ln in stdout.decode(errors="replace").splitlines() if ln.strip()]
    if not lines:
        raise ProbeError(f"probe printed nothing: {err_tail or 'no stderr'}")
    try:
        answer = json.loads(lines[-1])
    except ValueError as exc:
        raise ProbeError(f"probe printed no JSON: {lines[-1][:200]!r}") from exc
    if not isinstance(answer, dict):
        raise ProbeError("probe answer is not a JSON object")
    return answer


def _failed(error: str) -> ProbeResult:
    """The result of a failed probe: no figures, no runtimes, device accelerators only.

    Runtimes are left empty on purpose: a runtime whose import killed the probe would kill an
    inference task too, so the coordinator should not send it any.
    """
    accelerators, device_details = device_accelerators()
    return ProbeResult(
        bench=None,
        runtimes=(),
        accelerators=tuple(sorted({"cpu", *accelerators})),
        details={"error": error, "errors": [error], "devices": device_details},
        error=error,
    )


async def load_probe(
    state_dir: Path,
    *,
    agent_version: str,
    timeout: float = 60.0,
    refresh: bool = False,
    budget_s: float = DEFAULT_BUDGET_S,
) -> ProbeResult:
    """The probe's findings, from ``<state_dir>/probe.json`` when still valid, else measured.

    Measuring runs ``python -m lepton.agent.telemetry.measure`` (the same interpreter) and waits
    at most ``timeout`` seconds. ``refresh`` ignores the cache. Never raises for a probe failure:
    the result then has ``bench=None`` and ``error`` set, and is not cached, so the next start tries
    again.
    """
    if timeout <= 0:
        raise ValueError("timeout must be positive")
    path = state_dir / CACHE_FILE
    key = cache_key(agent_version)
    if key is not None and not refresh:
        cached = _read_cache(path, key)
        if cached is not None:
            logger.info("probe figures reused from %s: %s", path, _summary(cached))
            return cached
    started = time.monotonic()
    try:
        answer = await _run_subprocess(timeout, budget_s)
        result = _result_from_json(answer, from_cache=False)
    except ProbeError as exc:
        logger.error("start-up probe failed, running without benchmark figures: %s", exc)  # noqa: TRY400
        return _failed(str(exc))
    logger.info("start-up probe took %.2f s: %s", time.monotonic() - started, _summary(result))
    for error in result.details.get("errors", []):
        logger.warning("probe: %s", error)
    if key is not None:
        _write_cache(path, key, answer)
    return result


def _summary(result: ProbeResult) -> str:
    bench = result.bench
    figures = (
        f"fp32_gflops={bench.fp32_gflops} int8_gops={bench.int8_gops} runtime={bench.runtime!r}"
        if bench is not None
        else "no figures"
    )
    return (
        f"{figures} runtimes={','.join(result.runtimes) or '-'} "
        f"accelerators={','.join(result.accelerators) or '-'}"
    )
