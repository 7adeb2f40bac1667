"""Binding the endpoint's Unix socket with its configured mode and group from the start.

:func:`bind_unix` returns a bound, listening socket whose file already has the configured
mode and group: it is bound under a umask that leaves only the owner's bits, then chmod-ed
and chown-ed, and only then ``listen()``-ed, so there is no moment at which the file is
looser than configured, or at which anyone can connect before it is right.

The umask is process-wide: it is changed for the one ``bind()`` call, on the event loop's
thread, and restored at once. A file another thread creates in those microseconds gets
owner-only bits, which is tighter, never looser, than it asked for.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from pathlib import Path
from typing import Final

from lepton.common.errors import LeptonError

#: Leave the owner's read and write only while binding.
BIND_UMASK: Final = 0o177
BACKLOG: Final = 128


class SocketPathError(LeptonError, OSError):
    """The socket path cannot be used (not a socket, in use, wrong group). An ``OSError`` so
    the agent treats it like any other failure to listen."""


def clear_stale(path: Path) -> None:
    """Remove a socket file a crashed run left at ``path``; refuse anything else.

    A path that is not a socket is never deleted; a socket another process still accepts on
    is left to it (connecting to it succeeds) rather than taken over.
    """
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SocketPathError(
            errno.EEXIST, f"{path} exists and is not a socket; not removing it (move it away)"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        pass  # nobody listens: a stale file from a run that did not clean up
    except OSError:
        pass  # unreachable for another reason (timeout, permission): treat as stale
    else:
        raise SocketPathError(errno.EADDRINUSE, f"{path} is in use: another process listens on it")
    finally:
        probe.close()
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def bind_unix(path: Path, *, mode: int, gid: int) -> socket.socket:
    """A listening Unix socket at ``path`` with permission bits ``mode`` and group ``gid``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound = False
    try:
        old = os.umask(BIND_UMASK)
        try:
            sock.bind(str(path))
            bound = True
        finally:
            os.umask(old)
        try:
            # Group first, then the bits: a mode granting the group access only takes effect
            # once the group is the configured one.
            if os.stat(path).st_gid != gid:
                os.chown(path, -1, gid)
            os.chmod(path, mode)
        except PermissionError as exc:
            raise SocketPathError(
                errno.EPERM,
                f"cannot give {path} group {gid} and mode {mode:04o}: {exc.strerror} "
                "(the agent's user must be a member of endpoint.socket_group)",
            ) from exc
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        if bound:  # only ever the file this call made
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        raise
    return sock
