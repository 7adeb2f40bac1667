"""The device's credential toward the coordinator, and the one place that decides where it goes.

Every request the agent makes to the coordinator's origin (blob and weight downloads, update
uploads) carries ``Authorization: Bearer <fetch.http_token>``. A request to any other origin
(``fetch.origins`` may allow a CDN or a lab server) carries no token: the token would let
whoever runs that host act as this device. :meth:`CoordinatorCredentials.headers_for` is the
only way the agent's HTTP clients get the header.

An agent without a token still runs (a coordinator that does not check tokens serves it); it
says so once, at WARNING, with how to enrol.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Final

from lepton.agent.origins import OriginError, origin_of

log = logging.getLogger(__name__)

ENROL_HINT: Final = (
    "enrol it with `lepton-agent enroll <coordinator URL> <claim>` "
    "(a claim from `lepton devices enroll` on the coordinator)"
)
_warned = False


@dataclass(frozen=True, slots=True)
class CoordinatorCredentials:
    """The coordinator's origin and this device's token for it (None: not enrolled)."""

    coordinator_url: str | None = None
    token: str | None = field(default=None, repr=False)
    origin: str | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        origin = None
        if self.coordinator_url:
            try:
                origin = origin_of(self.coordinator_url)
            except OriginError:
                origin = None  # the config check reports a malformed URL; no token goes anywhere
        object.__setattr__(self, "origin", origin)

    @property
    def enrolled(self) -> bool:
        return self.token is not None

    def is_coordinator(self, url: str) -> bool:
        """Whether ``url`` is at the coordinator's origin (scheme, host and port all equal)."""
        if self.origin is None:
            return False
        try:
            return origin_of(url) == self.origin
        except OriginError:
            return False

    def headers_for(self, url: str) -> dict[str, str]:
        """The headers a request to ``url`` carries: the bearer token at the coordinator's
        origin, nothing elsewhere."""
        if self.token and self.is_coordinator(url):
            return {"Authorization": f"Bearer {self.token}"}
        return {}

    def refusal(self, url: str, status: int) -> tuple[str, str] | None:
        """(reason, detail) for a 401/403 from the coordinator, which means this device's
        credential is missing or no longer valid; None for any other answer."""
        if status not in (401, 403) or not self.is_coordinator(url):
            return None
        if not self.enrolled:
            return "not_enrolled", (
                f"the coordinator refused {url[:200]} (HTTP {status}): this device is not "
                f"enrolled; {ENROL_HINT}"
            )
        return "token_refused", (
            f"the coordinator refused this device's token for {url[:200]} (HTTP {status}): "
            "it may have been revoked; enrol the device again"
        )


def warn_if_not_enrolled(credentials: CoordinatorCredentials) -> None:
    """Log once per process (a simulator runs many agents) that the agent has no token."""
    global _warned  # noqa: PLW0603 - once per process, by design
    if credentials.enrolled or _warned:
        return
    _warned = True
    log.warning(
        "this device is not enrolled (no identity.json in its state directory and no "
        "LEPTON_FETCH_HTTP_TOKEN): a coordinator that checks device tokens will refuse its "
        "downloads and uploads; %s",
        ENROL_HINT,
    )
