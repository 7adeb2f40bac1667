"""The demo's release stages: a new agent version built, signed, published and rolled out in
phases to the simulated fleet; then a broken build, which aborts at its canary and leaves the
fleet on the good version.

Every device pins the kit's trust root and verifies each manifest and file itself before it
"installs" (:mod:`lepton.sim.updater`); the broken build carries the simulator's crash marker,
so each device that takes it fails its health trial and rolls back by itself, and the rollout's
abort criteria stop it before it leaves the canary. Figures are read back from the
coordinator (the rollout's per-device states, each device's reported version).

:class:`~lepton.demo.loop.Demo` makes a :class:`ReleaseKit` in the work directory before the
stack starts, passes :func:`stack_options` into its :class:`StackSpec`, and runs
:class:`ReleaseStages` after the model stages (:data:`STAGES` are the last rows).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx

from lepton.demo.release_kit import ReleaseKit, RolloutClient, fleet_versions
from lepton.demo.stack import Stack

#: (key, title), in the order they run.
STAGES: tuple[tuple[str, str], ...] = (
    ("release", "Signed agent release, phased rollout"),
    ("release_bad", "Broken release aborts at its canary"),
)
#: The version virtual devices start on, the good release and the broken one.
START, GOOD, BROKEN = "1.0.0", "1.1.0", "1.2.0"


class Reporter(Protocol):
    def begin(self, stage: str, total: int | None = None, detail: str = "") -> None: ...
    def update(
        self, stage: str, completed: int | None = None, detail: str | None = None
    ) -> None: ...
    def end(self, stage: str, detail: str = "") -> None: ...
    def fail(self, stage: str, detail: str) -> None: ...


def phases_for(devices: int) -> tuple[dict[str, Any], ...]:
    """A canary of a quarter of the fleet (2 to 10 devices), then 10 %, 50 %, 100 %."""
    canary = min(10, max(2, devices // 4))
    return ({"count": canary}, {"percent": 10.0}, {"percent": 50.0}, {"percent": 100.0})


def stack_options(kit: ReleaseKit, *, trial_s: float = 1.0) -> dict[str, Any]:
    """``StackSpec`` fields that make the stack take releases signed by ``kit``: the
    coordinator verifies bundles against its root, every virtual device pins it and starts on
    :data:`START`."""
    return {
        "coordinator_settings": {"releases.root_file": str(kit.root_file)},
        "sim_flags": (
            *("--release-root", str(kit.root_file)),
            *("--agent-version", START),
            *("--trial-s", str(trial_s)),
        ),
    }


@dataclass(frozen=True, slots=True, kw_only=True)
class RolloutFigures:
    version: str
    state: str
    phase: int | None
    seconds: float
    by_state: dict[str, int]
    versions: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "state": self.state,
            "phase": self.phase,
            "seconds": self.seconds,
            "by_state": self.by_state,
            "versions": self.versions,
        }


class ReleaseStages:
    """Runs the two release stages on a started stack whose fleet pins ``kit``'s root."""

    def __init__(
        self,
        stack: Stack,
        kit: ReleaseKit,
        reporter: Reporter,
        *,
        timeout_s: float = 300.0,
        check: Callable[[], None] | None = None,
    ) -> None:
        self.stack = stack
        self.kit = kit
        self.r = reporter
        self.timeout_s = timeout_s
        self.check = check or stack.check_alive
        self.figures: dict[str, Any] = {}
        #: The stage under way (for the caller's failure report).
        self.stage = STAGES[0][0]

    def run(self) -> dict[str, Any]:
        """Both stages; the figures (``release``: the good rollout, ``release_bad``)."""
        with contextlib.ExitStack() as scope:
            api = scope.enter_context(
                httpx.Client(
                    base_url=self.stack.api_url,
                    timeout=60,
                    headers=self.stack.headers,
                    verify=self.stack.verify,
                )
            )
            client = RolloutClient(api)
            out = self.stack.workdir / "bundles"
            n = self.stack.spec.devices
            self.stage = "release"
            self.r.begin("release", n, f"building and signing {self.kit.name} {GOOD}")
            good = self._ship(client, api, "release", GOOD, out, crashes=False, n=n)
            self.figures["release"] = good.as_dict()
            self.r.end(
                "release",
                f"{good.by_state.get('succeeded', 0)}/{n} devices committed {GOOD} in "
                f"{good.seconds:.1f}s (canary {phases_for(n)[0]['count']}, 10 %, 50 %, 100 %)",
            )
            self.stage = "release_bad"
            self.r.begin("release_bad", None, f"{BROKEN}: a build that crashes on start")
            bad = self._ship(client, api, "release_bad", BROKEN, out, crashes=True, n=n)
            self.figures["release_bad"] = bad.as_dict()
            back = bad.versions.get(GOOD, 0)
            took = sum(v for k, v in bad.by_state.items() if k not in ("pending", "skipped"))
            self.r.end(
                "release_bad",
                f"{bad.state} in phase {bad.phase} after {took} devices; {back}/{n} on {GOOD}",
            )
        return self.figures

    def _ship(
        self,
        client: RolloutClient,
        api: httpx.Client,
        stage: str,
        version: str,
        out: Path,
        *,
        crashes: bool,
        n: int,
    ) -> RolloutFigures:
        bundle = self.kit.build(version, out=out, crashes=crashes)
        client.publish(bundle)
        t0 = time.time()
        phases = phases_for(n)
        rid = client.create(
            self.kit.name,
            version,
            phases=phases,
            max_in_flight=max(10, n),
            abort_failure_share=0.1,
            abort_min_finished=min(5, phases[0]["count"]),
            revert_on_abort=True,
        )

        def progress(status: dict[str, Any]) -> None:
            done = client.count(status, "succeeded")
            self.r.update(
                stage,
                done,
                f"rollout {status['state']}, phase {status.get('phase')}: {done} committed",
            )

        status = client.wait(rid, self.timeout_s, check=self.check, on_status=progress)
        seconds = time.time() - t0
        # Devices settle after an abort (roll-backs and reverts); wait until none is midway.
        want = GOOD if crashes else version
        deadline = time.monotonic() + self.timeout_s
        while fleet_versions(api).get(want, 0) < n and time.monotonic() < deadline:
            self.check()
            time.sleep(0.5)
        status = client.status(rid)
        by_state = {str(k): int(v) for k, v in (status.get("counts") or {}).items()}
        return RolloutFigures(
            version=version,
            state=str(status["state"]),
            phase=status.get("phase"),
            seconds=seconds,
            by_state=by_state,
            versions=fleet_versions(api),
        )
