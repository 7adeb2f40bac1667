"""The planning kernel of a staged rollout: given its policy, its state and its devices'
states at ``now``, what to do next. Pure: no I/O, no clock, no randomness but a seeded one.

The kernel never dispatches anything itself; :func:`decide` returns a :class:`Decision`
(devices to start, to mark timed out or skipped, to revert; the rollout's next state and
phase; when to look again) and the feature (:mod:`.feature`) carries it out and records it.

Phases are cumulative: phase ``k`` covers the first ``target(k)`` devices of the rollout in
its order (a seeded shuffle by rollout id, interleaved across device classes so a canary
spreads over classes: :func:`order`). A phase ends when every device it covers has finished
(offline devices under the ``wait`` policy do not hold it: they are updated when they
return, until the rollout ends). Then the share of its finished devices that succeeded must
reach ``success_threshold`` to go on, else the rollout *fails*. At any time, once
``abort_min_finished`` devices finished, a failure share above ``abort_failure_share``
*aborts* it (within the canary too). A device running longer than ``device_timeout_s`` is
timed out (a failure), so a stuck device never blocks the rollout.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal, get_args

RolloutState = Literal["running", "paused", "waiting_approval", "completed", "aborted", "failed"]
DeviceState = Literal[
    "pending",
    "dispatched",
    "staged",
    "succeeded",
    "failed",
    "rolled_back",
    "timed_out",
    "skipped",
    "reverting",
    "reverted",
]
OfflinePolicy = Literal["wait", "skip"]

ROLLOUT_STATES: Final[tuple[str, ...]] = get_args(RolloutState)
DEVICE_STATES: Final[tuple[str, ...]] = get_args(DeviceState)
#: The rollout is over: nothing is started any more.
ENDED: Final = frozenset({"completed", "aborted", "failed"})
#: A device whose update is under way (counts against ``max_in_flight``).
IN_FLIGHT: Final = frozenset({"dispatched", "staged"})
#: Finished updates that count as failures.
FAILURES: Final = frozenset({"failed", "rolled_back", "timed_out"})
#: A device in one of these states is done with this rollout (``succeeded`` may still be
#: reverted after an abort).
FINISHED: Final = frozenset({"succeeded", "reverted", *FAILURES})
TERMINAL: Final = frozenset({*FINISHED, "skipped"})


@dataclass(frozen=True, slots=True, kw_only=True)
class Phase:
    """A cumulative step: the first ``count`` devices, or ``percent`` % of them (rounded
    up); ``approval``: the phase waits for an operator's approve before it starts."""

    count: int | None = None
    percent: float | None = None
    approval: bool = False

    def __post_init__(self) -> None:
        if (self.count is None) == (self.percent is None):
            raise ValueError("a phase has a count or a percent")
        if self.count is not None and self.count < 1:
            raise ValueError("a phase's count is at least 1")
        if self.percent is not None and not 0 < self.percent <= 100:
            raise ValueError("a phase's percent is in (0, 100]")

    def target(self, total: int) -> int:
        """How many devices of ``total`` this phase covers (cumulative)."""
        if self.count is not None:
            return min(self.count, total)
        assert self.percent is not None
        return min(total, math.ceil(total * self.percent / 100 - 1e-9))

    def describe(self) -> str:
        base = str(self.count) if self.count is not None else f"{self.percent:g}%"
        return base + (" (approval)" if self.approval else "")


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    """How a rollout proceeds (see the module doc); every bound is checked here."""

    phases: tuple[Phase, ...]
    rate_count: int = 0  # at most this many starts per rate_window_s; 0: unlimited
    rate_window_s: float = 60.0
    max_in_flight: int = 10
    success_threshold: float = 0.95
    abort_failure_share: float = 0.2
    abort_min_finished: int = 5
    device_timeout_s: float = 900.0
    offline: OfflinePolicy = "wait"
    revert_on_abort: bool = False

    def __post_init__(self) -> None:
        if not self.phases:
            raise ValueError("a rollout has at least one phase")
        last = self.phases[-1]
        if last.percent != 100:
            raise ValueError("the last phase is 100%")
        checks = (
            (self.rate_count >= 0, "rate_count >= 0"),
            (self.rate_window_s > 0, "rate_window_s > 0"),
            (self.max_in_flight >= 1, "max_in_flight >= 1"),
            (0 <= self.success_threshold <= 1, "success_threshold in [0, 1]"),
            (0 <= self.abort_failure_share <= 1, "abort_failure_share in [0, 1]"),
            (self.abort_min_finished >= 1, "abort_min_finished >= 1"),
            (self.device_timeout_s > 0, "device_timeout_s > 0"),
        )
        for ok, what in checks:
            if not ok:
                raise ValueError(what)


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceView:
    """One device of a rollout as the kernel sees it. ``seq``: its place in the order;
    ``started_at``: when its current step (update or revert) was dispatched."""

    id: str
    seq: int
    state: DeviceState
    online: bool = True
    started_at: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RolloutView:
    """The rollout's own state. ``phase``: the phase under way (or waiting for approval);
    ``approved``: phases an operator approved; ``revert``: take updated devices back
    (set when it was aborted with revert, or failed/aborted under ``revert_on_abort``)."""

    state: RolloutState
    phase: int = 0
    approved: frozenset[int] = frozenset()
    revert: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """What to do now. ``marks``: device id -> (new state, reason) for devices the kernel
    itself settles (timed out, skipped); ``start``: devices to dispatch, in order;
    ``revert``: updated devices to take back; ``wake_at``: when to decide again at the
    latest (None: only on an event)."""

    state: RolloutState
    phase: int
    reason: str = ""
    start: tuple[str, ...] = ()
    revert: tuple[str, ...] = ()
    marks: dict[str, tuple[DeviceState, str]] = field(default_factory=dict)
    wake_at: float | None = None
    revert_all: bool = False


def order(rollout_id: str, devices: Iterable[tuple[str, str | None]]) -> list[str]:
    """Device ids in rollout order: each class shuffled by a hash seeded with the rollout
    id, then the classes interleaved round-robin (largest first), so any prefix (a canary)
    spreads over the classes in proportion. Deterministic for a given rollout id."""

    def key(device_id: str) -> bytes:
        return hashlib.sha256(f"{rollout_id}\0{device_id}".encode()).digest()

    by_class: dict[str, list[str]] = defaultdict(list)
    for device_id, device_class in devices:
        by_class[device_class or ""].append(device_id)
    lanes = sorted(
        (sorted(ids, key=key) for ids in by_class.values()), key=lambda ids: (-len(ids), ids[0])
    )
    # Interleave by fractional position so each class is spread evenly over the order.
    placed = [
        ((i + 0.5) / len(lane), n, device_id)
        for n, lane in enumerate(lanes)
        for i, device_id in enumerate(lane)
    ]
    return [device_id for _, _, device_id in sorted(placed)]


@dataclass(frozen=True, slots=True, kw_only=True)
class Counts:
    """How many devices finished, failed and succeeded (over a set of devices)."""

    finished: int
    failed: int
    succeeded: int

    @classmethod
    def of(cls, devices: Iterable[DeviceView]) -> Counts:
        states = [d.state for d in devices]
        return cls(
            finished=sum(s in FINISHED for s in states),
            failed=sum(s in FAILURES for s in states),
            succeeded=sum(s in ("succeeded", "reverting", "reverted") for s in states),
        )


def decide(  # noqa: PLR0911, PLR0912
    policy: Policy, rollout: RolloutView, devices: Sequence[DeviceView], now: float
) -> Decision:
    """The next actions of a rollout (see the module doc)."""
    marks: dict[str, tuple[DeviceState, str]] = {}
    # Stuck devices time out whatever the rollout's state: they never block anything.
    for d in devices:
        running = d.state in IN_FLIGHT or d.state == "reverting"
        if running and d.started_at is not None and now >= d.started_at + policy.device_timeout_s:
            what = "revert" if d.state == "reverting" else "update"
            marks[d.id] = ("timed_out", f"{what} not finished in {policy.device_timeout_s:g}s")
    view = [_marked(d, marks) for d in devices]
    wake = _next_timeout(policy, view)

    state, phase = rollout.state, rollout.phase
    if state in ENDED:
        return _ended(rollout, view, marks, wake)

    total = Counts.of(view)
    if total.finished >= policy.abort_min_finished and (
        total.failed / total.finished > policy.abort_failure_share
    ):
        reason = (
            f"{total.failed} of {total.finished} finished devices failed "
            f"(over {policy.abort_failure_share:g})"
        )
        return _stop(policy, rollout, view, marks, wake, "aborted", reason)

    if state == "paused":
        return Decision(state=state, phase=phase, marks=marks, wake_at=wake)

    ordered = sorted(view, key=lambda d: d.seq)
    n = len(ordered)
    while True:
        current = policy.phases[phase]
        if current.approval and phase not in rollout.approved:
            return Decision(
                state="waiting_approval",
                phase=phase,
                reason=f"phase {phase + 1} ({current.describe()}) waits for approval",
                marks=marks,
                wake_at=wake,
            )
        covered = ordered[: current.target(n)]
        if policy.offline == "skip":
            for d in covered:
                if d.state == "pending" and not d.online:
                    marks[d.id] = ("skipped", "offline when its turn came")
            covered = [_marked(d, marks) for d in covered]
        holding = [
            d for d in covered if d.state in IN_FLIGHT or (d.state == "pending" and d.online)
        ]
        if holding:
            break
        done = Counts.of(covered)
        if done.finished and done.succeeded / done.finished < policy.success_threshold:
            reason = (
                f"phase {phase + 1}: {done.succeeded} of {done.finished} succeeded "
                f"(below {policy.success_threshold:g})"
            )
            return _stop(policy, rollout, view, marks, wake, "failed", reason)
        if phase + 1 == len(policy.phases):
            for d in ordered:
                if d.state == "pending":
                    marks[d.id] = ("skipped", "offline until the rollout ended")
            if any(d.state in IN_FLIGHT for d in ordered):
                break  # late offline returners still under way
            return Decision(state="completed", phase=phase, marks=marks, wake_at=wake)
        phase += 1

    start, rate_wake = _starts(policy, covered, view, now)
    wakes = [w for w in (wake, rate_wake) if w is not None]
    # Offline devices under "wait" that returned since are started too, with the rest.
    return Decision(
        state="running", phase=phase, start=start, marks=marks, wake_at=min(wakes, default=None)
    )


def _starts(
    policy: Policy, covered: Sequence[DeviceView], view: Sequence[DeviceView], now: float
) -> tuple[tuple[str, ...], float | None]:
    in_flight = sum(d.state in IN_FLIGHT for d in view)
    room = policy.max_in_flight - in_flight
    wake: float | None = None
    if policy.rate_count:
        window = [
            d.started_at
            for d in view
            if d.started_at is not None and d.started_at > now - policy.rate_window_s
        ]
        spare = policy.rate_count - len(window)
        if spare < room:
            window.sort()
            # The earliest start leaving the window frees a slot.
            wake = window[0] + policy.rate_window_s if window else None
        room = min(room, spare)
    ready = [d.id for d in covered if d.state == "pending" and d.online]
    return tuple(ready[: max(room, 0)]), wake if ready[max(room, 0) :] else None


def _marked(d: DeviceView, marks: dict[str, tuple[DeviceState, str]]) -> DeviceView:
    if d.id not in marks:
        return d
    return DeviceView(
        id=d.id, seq=d.seq, state=marks[d.id][0], online=d.online, started_at=d.started_at
    )


def _next_timeout(policy: Policy, view: Sequence[DeviceView]) -> float | None:
    deadlines = [
        d.started_at + policy.device_timeout_s
        for d in view
        if d.state in IN_FLIGHT | {"reverting"} and d.started_at is not None
    ]
    return min(deadlines, default=None)


def _stop(  # noqa: PLR0917
    policy: Policy,
    rollout: RolloutView,
    view: Sequence[DeviceView],
    marks: dict[str, tuple[DeviceState, str]],
    wake: float | None,
    state: RolloutState,
    reason: str,
) -> Decision:
    revert = rollout.revert or policy.revert_on_abort
    ended = RolloutView(state=state, phase=rollout.phase, approved=rollout.approved, revert=revert)
    out = _ended(ended, view, marks, wake)
    return Decision(
        state=state,
        phase=rollout.phase,
        reason=reason,
        revert=out.revert,
        marks=out.marks,
        wake_at=out.wake_at,
        revert_all=revert,
    )


def _ended(
    rollout: RolloutView,
    view: Sequence[DeviceView],
    marks: dict[str, tuple[DeviceState, str]],
    wake: float | None,
) -> Decision:
    """An ended rollout starts nothing: its pending devices are skipped; with ``revert``
    every device that took the update (now, or when an in-flight one succeeds later) is
    taken back."""
    for d in view:
        if d.state == "pending":
            marks[d.id] = ("skipped", f"rollout {rollout.state}")
    revert = tuple(d.id for d in view if rollout.revert and d.state == "succeeded")
    return Decision(
        state=rollout.state, phase=rollout.phase, revert=revert, marks=marks, wake_at=wake
    )
