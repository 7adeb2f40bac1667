"""Child processes of the demo: each in its own session, tied to the demo's life, stopped by group.

Every child starts in a new session (its own process group), so a Ctrl-C at the terminal
reaches only the demo, which then stops the children in order (fleet, coordinator, broker)
instead of all of them at once. On Linux each child also asks the kernel for SIGTERM when
the demo dies (``PR_SET_PDEATHSIG``), so even a demo killed with SIGKILL leaves nothing
behind. :func:`stop_group` signals the whole group: anything a child started goes too.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking for SIGTERM when the parent dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover - no libc to load
        return None
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def spawn(
    argv: Sequence[str],
    *,
    log_path: Path | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    stderr_pipe: bool = False,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own session; stdout and stderr go to ``log_path`` (or nowhere).

    ``stderr_pipe`` keeps stderr as a pipe instead (for callers that read a start-up error).
    """
    out = log_path.open("ab") if log_path is not None else subprocess.DEVNULL
    try:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.PIPE if stderr_pipe else out if log_path else subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_die_with_parent(),  # noqa: PLW1509 - only prctl and getppid run there
        )
    finally:
        if log_path is not None and not isinstance(out, int):
            out.close()


def signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Send ``sig`` to the child's process group (gone already: nothing happens)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def stop_group(proc: subprocess.Popen[bytes], *, timeout: float = 15.0, name: str = "") -> int:
    """SIGTERM the child's process group, wait ``timeout``, then SIGKILL; returns the exit code.

    The group is signalled again after the leader exits, so helpers it started go as well.
    """
    if proc.poll() is None:
        signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning(
                "%s (pid %d) ignored SIGTERM for %.0fs: killing it", name, proc.pid, timeout
            )
            signal_group(proc, signal.SIGKILL)
            proc.wait(timeout=10)
    signal_group(proc, signal.SIGKILL)  # stragglers in the group, if any
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    return int(proc.returncode)


def pid_alive(pid: int) -> bool:
    """True while a process with ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - someone else's process
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"
