"""Uploading a blob to the coordinator: ``PUT`` with its digest and length, retried.

The ``train`` handler sends model updates this way (see :mod:`lepton.agent.training.tasks`); the
coordinator's upload endpoint checks the digest header against the body it stored.

Two credentials travel, in two headers: the upload slot's (the round gave it with the task:
``X-Lepton-Upload-Token``) and the device's own (``Authorization: Bearer``, at the
coordinator's origin only; see :mod:`lepton.agent.credentials`). A device that has not
enrolled has no token, and the coordinator refuses its uploads (401).
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from typing import Final

from lepton.agent.credentials import CoordinatorCredentials
from lepton.agent.fetch import tls_refused
from lepton.agent.handlers import TaskError
from lepton.protocol.routes import UPLOAD_TOKEN_HEADER

log = logging.getLogger(__name__)

DIGEST_HEADER: Final = "X-Lepton-Digest"


def check_url(url: str, what: str) -> None:
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme not in ("http", "https"):
        raise TaskError(f"bad_params: {what} must be an http(s) URL, got {url[:80]!r}")


async def upload(
    url: str,
    body: bytes,
    *,
    digest: str,
    token: str | None = None,
    retries: int = 5,
    timeout: float = 30.0,
    backoff: tuple[float, float] = (0.5, 10.0),
    tls: ssl.SSLContext | None = None,
    credentials: CoordinatorCredentials | None = None,
) -> int:
    """``PUT`` ``body`` to ``url`` with its digest and length, the slot's ``token`` in
    ``X-Lepton-Upload-Token`` and the device's token from ``credentials`` (headers, so they
    stay out of URLs, logs and errors); returns the attempts made. HTTPS is verified with
    ``tls`` (None: the system's CAs).

    HTTPS is verified with ``tls`` (the fetcher's context, see
    :meth:`~lepton.agent.fetch.BlobFetcher.tls_context`; None: the system's CAs). Retries
    connection errors and HTTP 408/425/429/5xx up to ``retries`` times with capped, jittered
    exponential backoff; raises :class:`TaskError` when it gives up, at once when the
    server's certificate does not verify, and on any other non-2xx answer.
    """
    import httpx

    headers = {
        DIGEST_HEADER: f"sha256:{digest}",
        "Content-Type": "application/octet-stream",
        "Content-Length": str(len(body)),
    }
    credentials = credentials or CoordinatorCredentials()
    if token:
        headers[UPLOAD_TOKEN_HEADER] = token
    headers.update(credentials.headers_for(url))
    attempts = 0
    # No redirects: the caller checked this URL's origin, not wherever it points on to.
    async with httpx.AsyncClient(
        timeout=httpx.Timeout(timeout), follow_redirects=False, verify=tls or True
    ) as client:
        while True:
            attempts += 1
            try:
                resp = await client.put(url, content=body, headers=headers)
            except httpx.TransportError as exc:
                if tls_refused(exc):
                    raise TaskError(
                        f"upload_refused: PUT {url}: the server's certificate did not verify"
                    ) from exc
                problem = type(exc).__name__
            else:
                status = resp.status_code
                if 200 <= status < 300:
                    return attempts
                # The answer's body is not echoed: results carry only what the agent knows.
                refused = credentials.refusal(url, status) if status == 401 else None
                if refused is not None:
                    raise TaskError(f"upload_refused: PUT {url}: {refused[0]}: {refused[1]}")
                if status not in (408, 425, 429) and status < 500:
                    raise TaskError(f"upload_refused: PUT {url}: HTTP {status}")
                problem = f"HTTP {status}"
            if attempts > retries:
                raise TaskError(f"upload_failed: PUT {url}: {problem} (gave up after {attempts})")
            low, high = backoff
            delay = random.uniform(low, min(high, low * 2 ** (attempts - 1)))
            log.info("upload to %s failed (%s); retry %d in %.2f s", url, problem, attempts, delay)
            await asyncio.sleep(delay)
