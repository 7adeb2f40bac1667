"""A rollout's plan: what goes where, and how (the body of ``POST /v1/rollouts``, stored as
JSON with the rollout).

Every field is bounded by the struct (msgspec refuses anything else with the field's path);
:meth:`Plan.policy` builds the kernel's :class:`~.engine.Policy`, which checks what spans
fields (the last phase is 100 %). :func:`parse_phases` reads the CLI's phase text.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import Meta

from lepton.common.errors import LeptonError
from lepton.coordinator.model_registry.deploy import MAX_DEVICE_IDS, DeviceSelector
from lepton.coordinator.rollouts.engine import Phase, Policy

MAX_PHASES: Final = 20
MAX_DEVICES: Final = 1_000_000
MAX_TIMEOUT_S: Final = 7 * 86400.0
NAME_PATTERN: Final = r"\A[A-Za-z0-9._-]{1,64}\Z"
AGENT_VERSION_PATTERN: Final = r"\A[0-9]{1,6}\.[0-9]{1,6}\.[0-9]{1,6}\Z"
MODEL_VERSION_PATTERN: Final = r"\A[1-9][0-9]{0,9}\Z"
SELECT_PATTERN: Final = r"\A[A-Za-z0-9._:/-]{1,64}\Z"
IDENT_PATTERN: Final = r"\A[A-Za-z0-9][A-Za-z0-9._:-]{0,63}\Z"

Name = Annotated[str, Meta(pattern=NAME_PATTERN)]
Select = Annotated[str, Meta(pattern=SELECT_PATTERN)]
Share = Annotated[float, Meta(ge=0.0, le=1.0)]


class PlanError(LeptonError, ValueError):
    """A plan that cannot run; the message says why."""


class PhaseSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The first ``count`` devices, or ``percent`` % of them (cumulative)."""

    count: Annotated[int, Meta(ge=1, le=MAX_DEVICES)] | None = None
    percent: Annotated[float, Meta(gt=0.0, le=100.0)] | None = None
    approval: bool = False


class SelectorSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Which devices; every given criterion must hold (none: the whole fleet)."""

    device_class: Select | None = None
    tag: Select | None = None
    group: Select | None = None
    device_ids: Annotated[
        list[Annotated[str, Meta(pattern=IDENT_PATTERN)]], Meta(max_length=MAX_DEVICE_IDS)
    ] = []

    def selector(self) -> DeviceSelector:
        return DeviceSelector(
            device_class=self.device_class,
            tag=self.tag,
            group=self.group,
            device_ids=tuple(dict.fromkeys(self.device_ids)),
        )


class ProbeSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Models: after the deploy, an ``infer`` on ``source`` must not be worse than the
    baseline (the same infer before the deploy on the device, else the rollout's median) by
    more than ``max_accuracy_drop`` (absolute) or ``max_latency_increase`` (relative p50)."""

    source: Select
    max_accuracy_drop: Share = 0.02
    max_latency_increase: Annotated[float, Meta(ge=0.0, le=100.0)] = 0.2
    limit: Annotated[int, Meta(ge=1, le=1_000_000)] | None = 256


class Plan(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A staged rollout of an agent release or a model version (see the module doc)."""

    kind: Literal["agent", "model"]
    name: Name
    version: Annotated[str, Meta(max_length=24)]
    selector: SelectorSpec = SelectorSpec()
    phases: Annotated[list[PhaseSpec], Meta(min_length=1, max_length=MAX_PHASES)] = msgspec.field(
        default_factory=lambda: [PhaseSpec(percent=100.0)]
    )
    rate_count: Annotated[int, Meta(ge=0, le=MAX_DEVICES)] = 0
    rate_window_s: Annotated[float, Meta(gt=0.0, le=86400.0)] = 60.0
    max_in_flight: Annotated[int, Meta(ge=1, le=MAX_DEVICES)] = 10
    success_threshold: Share = 0.95
    abort_failure_share: Share = 0.2
    abort_min_finished: Annotated[int, Meta(ge=1, le=MAX_DEVICES)] = 5
    device_timeout_s: Annotated[float, Meta(gt=0.0, le=MAX_TIMEOUT_S)] = 900.0
    offline: Literal["wait", "skip"] = "wait"
    revert_on_abort: bool = False
    #: Agent releases: how long the new version's self-checks may take on the device.
    health_deadline_s: Annotated[float, Meta(gt=0.0, le=3600.0)] = 300.0
    probe: ProbeSpec | None = None
    #: What a revert goes back to (models: the version deployed on abort; default: the
    #: newest servable version below ``version``). Agents revert to each device's own.
    previous_version: Annotated[str, Meta(max_length=24)] | None = None

    def check(self) -> None:
        """:class:`PlanError` for what the struct's bounds cannot say."""
        pattern = AGENT_VERSION_PATTERN if self.kind == "agent" else MODEL_VERSION_PATTERN
        for what, value in (("version", self.version), ("previous_version", self.previous_version)):
            if value is not None and not re.match(pattern, value):
                raise PlanError(f"{what} {value!r} is not a {self.kind} version")
        if self.probe is not None and self.kind != "model":
            raise PlanError("a probe is for model rollouts")
        try:
            self.policy()
        except ValueError as exc:
            raise PlanError(str(exc)) from exc

    def policy(self) -> Policy:
        return Policy(
            phases=tuple(
                Phase(count=p.count, percent=p.percent, approval=p.approval) for p in self.phases
            ),
            rate_count=self.rate_count,
            rate_window_s=self.rate_window_s,
            max_in_flight=self.max_in_flight,
            success_threshold=self.success_threshold,
            abort_failure_share=self.abort_failure_share,
            abort_min_finished=self.abort_min_finished,
            device_timeout_s=self.device_timeout_s,
            offline=self.offline,
            revert_on_abort=self.revert_on_abort,
        )

    def target(self) -> str:
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = msgspec.to_builtins(self)
        return out


def plan_of(data: Any) -> Plan:
    """A checked :class:`Plan` from decoded JSON; :class:`PlanError` says what is wrong."""
    try:
        plan = msgspec.convert(data, Plan)
    except msgspec.ValidationError as exc:
        raise PlanError(str(exc)) from exc
    plan.check()
    return plan


_PHASE = re.compile(r"\A(?:canary:)?(?P<n>[0-9]+(?:\.[0-9]+)?)(?P<pct>%)?(?P<gate>\+approve)?\Z")
_RATE = re.compile(r"\A(?P<n>[0-9]+)/(?P<unit>s|sec|min|m|h|hour)\Z")
_UNITS: Final = {"s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0, "hour": 3600.0}


def parse_phases(text: str, approve_after: tuple[int, ...] = ()) -> list[PhaseSpec]:
    """``"canary:5,10%,50%,100%"`` -> phases (a bare number is a count, ``N%`` a share,
    a ``+approve`` suffix gates that phase). ``approve_after``: 1-based phases after which an
    operator must approve (the next phase is gated)."""
    phases: list[PhaseSpec] = []
    for part in (p.strip() for p in text.split(",")):
        m = _PHASE.match(part)
        if m is None:
            raise PlanError(f"phase {part!r}: want N, N% or canary:N (optionally +approve)")
        value, gate = m["n"], bool(m["gate"])
        if m["pct"]:
            phases.append(PhaseSpec(percent=float(value), approval=gate))
        elif "." in value:
            raise PlanError(f"phase {part!r}: a count is a whole number")
        else:
            phases.append(PhaseSpec(count=int(value), approval=gate))
    for after in approve_after:
        if not 1 <= after < len(phases):
            raise PlanError(f"--approve-after {after}: phases are 1..{len(phases) - 1} here")
        p = phases[after]
        phases[after] = PhaseSpec(count=p.count, percent=p.percent, approval=True)
    return phases


def parse_rate(text: str) -> tuple[int, float]:
    """``"60/min"`` -> (60, 60.0): a count per window in seconds."""
    m = _RATE.match(text.strip())
    if m is None:
        raise PlanError(f"rate {text!r}: want N/s, N/min or N/h")
    return int(m["n"]), _UNITS[m["unit"]]
