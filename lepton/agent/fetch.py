"""Content-addressed, verified, resumable HTTP downloads into a local cache.

``BlobFetcher.fetch(digest=, size=, url=)`` returns the path of the content in
``<root>/sha256/<digest>`` (re-hashed when found there), or downloads it: streamed into
``<root>/partial/<digest>.part``, never accepting more than the declared ``size``, resumed with
a ``Range`` request after an interruption (retried with capped exponential backoff; the part
file is kept between attempts and between fetches of the same digest), and moved into the
cache only once its sha256 matches. Models and federated weights both come through here.

Only URLs at an allowed origin (:class:`~lepton.agent.origins.Origins`) are fetched, checked before
any connection; redirects are not followed. A refusal is a :class:`FetchError` whose
``reason`` comes from a fixed vocabulary (``refused_origin``, ``http_<status>``,
``connect_failed``, ``timeout``, ``download_failed``, ``too_large``, ``digest_mismatch``,
``no_space``, ``tls_verify_failed``, ``not_enrolled``, ``token_refused``) and whose detail is
written here: nothing the remote end sent (a body, an error text) is ever echoed into a
task's result.

Requests to the coordinator's origin carry the device's token
(:class:`~lepton.agent.credentials.CoordinatorCredentials`); requests elsewhere carry none. A
401/403 from the coordinator is ``not_enrolled`` (the device has no token) or
``token_refused`` (its token was refused), never retried.

HTTPS is verified with one :class:`ssl.SSLContext` (:meth:`BlobFetcher.tls_context`: the one
given, built from ``[fetch] ca_file`` by the daemon, else the system's CAs); uploads use the
same one. A server that fails verification is refused at once, without retries: another
attempt would meet the same certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
import shutil
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from lepton.agent.credentials import CoordinatorCredentials
from lepton.agent.origins import Origins
from lepton.common.errors import LeptonError

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)


class FetchError(LeptonError):
    """A fetch was refused; ``reason`` is a stable token (see the module docstring), and
    ``detail`` holds only what the agent knows itself (URL, sizes, attempts)."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"fetch: {reason}: {detail}")


def _give_up_reason(exc: Exception) -> str:
    """The vocabulary token for the last failure of a retried download."""
    import httpx

    if isinstance(exc, httpx.ConnectError):
        return "connect_failed"
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, _Retry) and exc.status is not None:
        return f"http_{exc.status}"
    return "download_failed"


def tls_refused(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) is a failed certificate verification."""
    seen: BaseException | None = exc
    for _ in range(8):  # httpx wraps httpcore's error, which wraps ssl's
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@dataclass(frozen=True, slots=True)
class _Want:
    digest: str
    size: int
    url: str
    name: str


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1024 * 1024):
            h.update(chunk)
    return h.hexdigest()


def fsync_replace(src: Path, dst: Path) -> None:
    with src.open("rb") as fh:
        os.fsync(fh.fileno())
    os.replace(src, dst)
    with contextlib.suppress(OSError):  # directory fsync is not possible everywhere
        fd = os.open(dst.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass(slots=True)
class _Transfer:
    received: int = 0  # bytes taken off the network, over all attempts


#: Answers that say the server is busy, not broken (a whole fleet fetching one release at
#: once): they have their own, longer budget and backoff, and honour ``Retry-After``.
BUSY_STATUSES: Final = frozenset({429, 503})
BUSY_RETRIES: Final = 12
BUSY_BACKOFF_MAX_S: Final = 30.0
MAX_RETRY_AFTER_S: Final = 120.0


class _Retry(Exception):  # noqa: N818 - internal control flow, never escapes
    """A download attempt failed in a way worth retrying (``status``: the HTTP answer's;
    ``retry_after``: the server's ``Retry-After`` in seconds, when it sent one)."""

    def __init__(
        self, message: str, status: int | None = None, retry_after: float | None = None
    ) -> None:
        self.status = status
        self.retry_after = retry_after
        super().__init__(message)


def retry_after_s(value: str | None) -> float | None:
    """``Retry-After`` as seconds (delta-seconds only; an HTTP date is ignored), bounded."""
    try:
        return min(MAX_RETRY_AFTER_S, max(0.0, float(value))) if value else None
    except ValueError:
        return None


class BlobFetcher:
    """Fetches content by sha256 into ``root`` (see the module docstring)."""

    def __init__(
        self,
        root: Path,
        *,
        retries: int = 5,
        timeout: float = 30.0,
        backoff: tuple[float, float] = (0.5, 10.0),
        origins: Origins | None = None,
        tls: ssl.SSLContext | None = None,
        credentials: CoordinatorCredentials | None = None,
    ) -> None:
        self.root = root
        #: Whose token goes where (None: no token is sent anywhere).
        self.credentials = credentials or CoordinatorCredentials()
        #: Where URLs may point; None: anywhere (for library use; the agent always sets it).
        self.origins = origins
        self.retries = retries
        self.timeout = timeout
        self.backoff = backoff
        self._digest_locks: dict[str, asyncio.Lock] = {}
        self._tls: ssl.SSLContext | None = tls

    @property
    def cache_dir(self) -> Path:
        return self.root / "sha256"

    @property
    def tls(self) -> ssl.SSLContext | None:
        """The context given or made so far (None: not made yet, the system's CAs)."""
        return self._tls

    async def tls_context(self) -> ssl.SSLContext:
        """The context every HTTPS fetch and upload verifies the server with."""
        if self._tls is None:  # loading the system CA bundle takes a while; once, off the loop
            import httpx

            self._tls = await asyncio.to_thread(httpx.create_ssl_context)
        return self._tls

    @property
    def partial_dir(self) -> Path:
        return self.root / "partial"

    def cached_path(self, digest: str) -> Path:
        return self.cache_dir / digest

    def partial_path(self, digest: str) -> Path:
        return self.partial_dir / f"{digest}.part"

    async def fetch(self, *, digest: str, size: int, url: str, what: str = "") -> tuple[Path, int]:
        """The verified cache path of ``digest``'s content and the bytes downloaded for it."""
        self.check_url(url)
        spec = _Want(digest=digest, size=size, url=url, name=what or digest[:12])
        lock = self._digest_locks.setdefault(spec.digest, asyncio.Lock())
        async with lock:
            final = self.cached_path(spec.digest)
            if final.exists():
                actual = await asyncio.to_thread(sha256_file, final)
                if actual == spec.digest:
                    os.utime(final)  # most recently used, for pruning
                    return final, 0
                log.warning(
                    "cached model %s is damaged (sha256 %s); fetching again",
                    spec.digest[:12],
                    actual[:12],
                )
                final.unlink(missing_ok=True)
            await asyncio.to_thread(self._prepare_dirs)
            part = self.partial_path(spec.digest)
            downloaded = await self._download(spec, part)
            actual = await asyncio.to_thread(sha256_file, part)
            if actual != spec.digest:
                part.unlink(missing_ok=True)
                raise FetchError(
                    "digest_mismatch", f"the content of {spec.url} does not hash to {spec.digest}"
                )
            await asyncio.to_thread(fsync_replace, part, final)
            return final, downloaded

    def check_url(self, url: str) -> None:
        """Raise ``FetchError("refused_origin")`` unless ``url`` is at an allowed origin."""
        if self.origins is not None and not self.origins.permits(url):
            raise FetchError(
                "refused_origin",
                f"{url[:200]} is not at an allowed origin ({self.origins.describe()})",
            )

    def _prepare_dirs(self) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.partial_dir.mkdir(parents=True, exist_ok=True)

    async def _download(self, spec: _Want, part: Path) -> int:
        import httpx

        tls = await self.tls_context()
        timeout = httpx.Timeout(self.timeout)
        transfer = _Transfer()
        failures = busy = 0
        # No redirects: one would lead the agent off the allowed origins.
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=False, verify=tls) as client:
            while True:
                have = await asyncio.to_thread(usable_part, part, spec.size)
                if have == spec.size:
                    return transfer.received
                free = (await asyncio.to_thread(shutil.disk_usage, part.parent)).free
                if free < spec.size - have:
                    raise FetchError("no_space", f"{spec.size - have} bytes needed, {free} free")
                try:
                    await self._attempt(client, spec, part, have, transfer)
                except (httpx.TransportError, _Retry) as exc:
                    busy_answer = isinstance(exc, _Retry) and exc.status in BUSY_STATUSES
                    if busy_answer:
                        busy += 1
                    else:
                        failures += 1
                    if tls_refused(exc):
                        raise FetchError(
                            "tls_verify_failed",
                            f"GET {spec.url}: the server's certificate did not verify",
                        ) from exc
                    if failures > self.retries or busy > BUSY_RETRIES:
                        kept = await asyncio.to_thread(usable_part, part, spec.size)
                        raise FetchError(
                            _give_up_reason(exc),
                            f"GET {spec.url} gave up after {failures + busy} attempts; "
                            f"{kept} of {spec.size} bytes kept to resume",
                        ) from exc
                    low, high = self.backoff
                    n, cap = (busy, BUSY_BACKOFF_MAX_S) if busy_answer else (failures, high)
                    delay = random.uniform(low, min(cap, low * 2 ** (n - 1)))
                    if isinstance(exc, _Retry) and exc.retry_after is not None:
                        delay = max(delay, exc.retry_after)
                    log.info(
                        "download of %s interrupted (%s); retry %d in %.2f s",
                        spec.name,
                        exc,
                        failures + busy,
                        delay,
                    )
                    await asyncio.sleep(delay)

    async def _attempt(
        self,
        client: httpx.AsyncClient,
        spec: _Want,
        part: Path,
        have: int,
        transfer: _Transfer,
    ) -> None:
        """One GET from ``have`` on, counting into ``transfer``. Raises _Retry/ModelError."""
        headers = {"Accept-Encoding": "identity", **self.credentials.headers_for(spec.url)}
        if have:
            headers["Range"] = f"bytes={have}-"
        async with client.stream("GET", spec.url, headers=headers) as resp:
            status = resp.status_code
            if status == 206 and have and range_start(resp.headers.get("content-range")) == have:
                mode = "ab"
            elif status == 200:
                mode, have = "wb", 0  # the server ignored the range: start over
            elif status == 416:
                await asyncio.to_thread(part.unlink, missing_ok=True)
                raise _Retry("range not satisfiable; restarting")
            elif status in (408, 425, 429) or status >= 500:
                raise _Retry(
                    f"HTTP {status}", status, retry_after_s(resp.headers.get("retry-after"))
                )
            elif refused := self.credentials.refusal(spec.url, status):
                raise FetchError(*refused)
            else:  # 3xx included: redirects are not followed
                raise FetchError(f"http_{status}", f"GET {spec.url} answered HTTP {status}")
            length = resp.headers.get("content-length")
            if length is not None and length.isdigit() and have + int(length) > spec.size:
                await asyncio.to_thread(part.unlink, missing_ok=True)
                raise FetchError(
                    "too_large",
                    f"server announces {have + int(length)} bytes, declared size is {spec.size}",
                )
            fh = await asyncio.to_thread(part.open, mode)
            try:
                # No chunk size: httpx would hold back a partial chunk when the connection
                # drops, and those bytes would be fetched again.
                async for chunk in resp.aiter_raw():
                    if have + len(chunk) > spec.size:
                        fh.close()
                        await asyncio.to_thread(part.unlink, missing_ok=True)
                        raise FetchError(
                            "too_large", f"server sent more than the declared {spec.size} bytes"
                        )
                    # Written as it arrives, so an interrupted transfer resumes from here.
                    await asyncio.to_thread(fh.write, chunk)
                    have += len(chunk)
                    transfer.received += len(chunk)
            finally:
                fh.close()
        if have < spec.size:
            raise _Retry(f"body ended after {have} of {spec.size} bytes")


def usable_part(part: Path, size: int) -> int:
    """Bytes of ``part`` worth resuming from (a part longer than ``size`` is discarded)."""
    try:
        have = part.stat().st_size
    except FileNotFoundError:
        return 0
    if have > size:
        part.unlink(missing_ok=True)
        return 0
    return have


def range_start(content_range: str | None) -> int | None:
    """``bytes 100-199/200`` -> 100."""
    if not content_range or not content_range.startswith("bytes "):
        return None
    start = content_range[6:].split("-", 1)[0]
    return int(start) if start.isdigit() else None
