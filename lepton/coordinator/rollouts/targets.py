"""What a rollout sends a device, per kind, as task requests for the normal task path.

Agent releases: ``install`` of the release built for the device's class (the releases
feature's :class:`ReleaseSource`), ``revert`` to the version the device ran before. Models:
``deploy`` of the target version (or, to take it back, of the previous one) and, with a
probe, ``infer`` on the probe's data source before and after the deploy. Every task is
pinned to its device, may start until the rollout's per-device timeout, and is tried up to
:data:`MAX_ATTEMPTS` times.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from lepton.common.errors import LeptonError
from lepton.coordinator.model_registry.deploy import DEMAND_GOPS, deploy_params
from lepton.coordinator.model_registry.registry import ModelRecord, ModelRegistry
from lepton.coordinator.rollouts.plan import Plan
from lepton.coordinator.tasks.request import TaskRequest
from lepton.protocol.releases import RevertParams
from lepton.protocol.tasks import (
    DEPLOY,
    INFER,
    INSTALL,
    REVERT,
    InferParams,
    encode_params,
)

#: One more attempt for a task whose device dropped off while running it, or failed it for
#: a passing reason; the per-device timeout bounds all attempts together. What the device
#: answers in its output (an install refusal) is final.
MAX_ATTEMPTS: Final = 2


class TargetError(LeptonError, ValueError):
    """The rollout's target cannot be sent to a device (the reason says why)."""


class DeviceUpdateLike(Protocol):
    """A device's last update status, as the releases feature keeps it."""

    @property
    def version(self) -> str: ...
    @property
    def outcome(self) -> str: ...
    @property
    def target(self) -> str | None: ...
    @property
    def reason(self) -> str: ...


class ReleaseSource(Protocol):
    """The releases feature as rollouts use it (agent-image rollouts)."""

    def install(
        self,
        name: str,
        version: str,
        device_class: str | None,
        *,
        base_url: str,
        health_deadline_s: float,
        rollout: str,
    ) -> dict[str, Any] | None:
        """The ``install`` params for a device of ``device_class`` (None: no build of the
        release is for that class)."""
        ...

    def updates(self, device_ids: Sequence[str]) -> Mapping[str, DeviceUpdateLike]:
        """The last update status of each device that reported one."""
        ...


@dataclass(frozen=True, slots=True)
class Targets:
    """Task requests for one coordinator; ``releases`` None: agent rollouts are refused."""

    registry: ModelRegistry | None
    releases: ReleaseSource | None
    base_url: Callable[[], str]

    def check(self, plan: Plan) -> None:
        """:class:`TargetError` unless the plan's target (and revert target) exist."""
        if plan.kind == "agent":
            if self.releases is None:
                raise TargetError("agent releases are not available on this coordinator")
            return
        self.model(plan, plan.version)
        if plan.previous_version is not None:
            self.model(plan, plan.previous_version)

    def model(self, plan: Plan, version: str) -> ModelRecord:
        if self.registry is None:
            raise TargetError("the model registry is not available on this coordinator")
        record = self.registry.get(plan.name, int(version))
        deploy_params(record, "http://check")  # raises DeployError for an unservable format
        return record

    def previous_model(self, plan: Plan) -> str | None:
        """The version a model rollout goes back to: the plan's, else the newest servable
        version below the target."""
        if plan.previous_version is not None or self.registry is None:
            return plan.previous_version
        older = [
            r.version
            for r in self.registry.list(plan.name)
            if r.version < int(plan.version) and r.format in ("onnx", "tflite")
        ]
        return str(max(older)) if older else None

    def matches(self, plan: Plan, device_class: str | None) -> bool:
        """Whether a device of ``device_class`` can take the target (agents: a build of the
        release is for its class)."""
        if plan.kind != "agent" or self.releases is None:
            return True
        return (
            self.releases.install(
                plan.name,
                plan.version,
                device_class,
                base_url="http://check",
                health_deadline_s=plan.health_deadline_s,
                rollout="check",
            )
            is not None
        )

    def class_filter(self, plan: Plan) -> Callable[[str | None], bool]:
        """:meth:`matches` with one look-up per device class."""
        seen: dict[str | None, bool] = {}

        def fits(device_class: str | None) -> bool:
            if device_class not in seen:
                seen[device_class] = self.matches(plan, device_class)
            return seen[device_class]

        return fits

    def install(
        self, plan: Plan, rollout_id: str, device_id: str, device_class: str | None
    ) -> TaskRequest:
        if plan.kind == "agent":
            assert self.releases is not None
            params = self.releases.install(
                plan.name,
                plan.version,
                device_class,
                base_url=self.base_url(),
                health_deadline_s=plan.health_deadline_s,
                rollout=rollout_id,
            )
            if params is None:
                raise TargetError(f"no build of {plan.target()} for class {device_class}")
            return _request(plan, INSTALL, params, device_id)
        return self.deploy(plan, plan.version, device_id)

    def deploy(self, plan: Plan, version: str, device_id: str) -> TaskRequest:
        record = self.model(plan, version)
        params = encode_params(DEPLOY, deploy_params(record, self.base_url()))
        return _request(plan, DEPLOY, params, device_id, input_bytes=record.size)

    def probe(self, plan: Plan, device_id: str) -> TaskRequest:
        assert plan.probe is not None
        params = InferParams(model=plan.name, source=plan.probe.source, limit=plan.probe.limit)
        return _request(plan, INFER, encode_params(INFER, params), device_id)

    def revert(
        self, plan: Plan, rollout_id: str, device_id: str, from_version: str | None
    ) -> TaskRequest:
        if plan.kind == "agent":
            if from_version is None:
                raise TargetError("the version before the update is not known")
            params = RevertParams(
                to_version=from_version,
                health_deadline_s=plan.health_deadline_s,
                rollout=rollout_id,
            )
            return _request(plan, REVERT, encode_params(REVERT, params), device_id)
        previous = self.previous_model(plan)
        if previous is None:
            raise TargetError(f"no version of {plan.name} below {plan.version} to go back to")
        return self.deploy(plan, previous, device_id)


def _request(
    plan: Plan, kind: str, params: dict[str, Any], device_id: str, *, input_bytes: int = 0
) -> TaskRequest:
    return TaskRequest(
        kind=kind,
        params=params,
        demand_gops=DEMAND_GOPS,
        input_bytes=input_bytes,
        device_id=device_id,
        max_attempts=MAX_ATTEMPTS,
        expires_in_s=plan.device_timeout_s,
    )


@dataclass(frozen=True, slots=True)
class ReleasesLink:
    """A :class:`ReleaseSource` over the releases feature's objects: ``release_store``
    (``for_device(name, version, device_class)``), ``update_repo`` (``get_many(ids)``) and
    ``make_params`` (``install_params(record, base_url, *, health_deadline_s, rollout)``)."""

    release_store: Any
    update_repo: Any
    make_params: Callable[..., Any]

    def install(
        self,
        name: str,
        version: str,
        device_class: str | None,
        *,
        base_url: str,
        health_deadline_s: float,
        rollout: str,
    ) -> dict[str, Any] | None:
        record = self.release_store.for_device(name, version, device_class or "")
        if record is None:
            return None
        params = self.make_params(
            record, base_url, health_deadline_s=health_deadline_s, rollout=rollout
        )
        return encode_params(INSTALL, params)

    def updates(self, device_ids: Sequence[str]) -> Mapping[str, DeviceUpdateLike]:
        found: Mapping[str, DeviceUpdateLike] = self.update_repo.get_many(list(device_ids))
        return found
