"""Deploying a registered model version to devices.

One ``deploy`` task per chosen device, pinned to it and submitted through the normal task
path (:func:`lepton.coordinator.tasks.submit.build_task`, then the task repository's
``submit``), so the scheduler dispatches it, retries it and records its result like any
other task. The task tells the agent where to fetch the artifact: the coordinator's blob
route by content address (digest and size travel in the task, the bytes over HTTP).

Devices are chosen by :class:`DeviceSelector`: named ids (``--device``, each must exist), a
device class and a tag. Every given criterion must hold. Without ids the online devices of
the fleet are chosen (an offline one would hold its task until the task expires); named ids
are taken whatever their state, since their tasks wait for them until they expire.

``lepton models deploy`` (:mod:`.cli`) and ``POST /v1/models/{name}/deploy`` (:mod:`.routes`)
are the two ways in; ``lepton-demo`` deploys through the route.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from lepton.common.errors import LeptonError
from lepton.coordinator.config import Config
from lepton.coordinator.errors import NotFoundError
from lepton.coordinator.model_registry.registry import ModelRecord, ModelRegistry
from lepton.coordinator.store import DeviceRecord, NewTask, TaskRecord
from lepton.coordinator.store.devices import DeviceRepo
from lepton.coordinator.store.tasks import TaskRepo
from lepton.coordinator.tasks.request import TaskRequest
from lepton.coordinator.tasks.submit import build_task
from lepton.protocol import routes
from lepton.protocol.tasks import DEPLOY, DeployParams, encode_params

KIND: Final = DEPLOY
# What the agent's deploy handler loads (DeployParams.format); a torch checkpoint is not served.
DEPLOYABLE_FORMATS: Final = ("onnx", "tflite")
# A download and a session load: the task is pinned, so its demand only orders the queue.
DEMAND_GOPS: Final = 0.01
MAX_DEVICE_IDS: Final = 10_000
_PAGE: Final = 1000


class DeployError(LeptonError, ValueError):
    """Nothing to deploy: the version cannot be served, or no device matches."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceSelector:
    """Which devices get the model; every given criterion must hold."""

    device_class: str | None = None
    tag: str | None = None
    device_ids: tuple[str, ...] = ()
    #: An operator-assigned device group (``DeviceRecord.groups``).
    group: str | None = None

    def matches(self, device: DeviceRecord) -> bool:
        return (
            (not self.device_ids or device.id in self.device_ids)
            and (self.device_class is None or device.device_class == self.device_class)
            and (self.tag is None or self.tag in device.tags)
            and (self.group is None or self.group in device.groups)
        )

    def describe(self) -> str:
        parts = [f"class {self.device_class}"] if self.device_class else []
        parts += [f"tag {self.tag}"] if self.tag else []
        parts += [f"group {self.group}"] if self.group else []
        parts += [f"ids {', '.join(self.device_ids)}"] if self.device_ids else []
        return " and ".join(parts) or "every online device"


@dataclass(frozen=True, slots=True)
class Deployment:
    """A model version and the deploy tasks submitted for it (one per device)."""

    model: ModelRecord
    tasks: list[TaskRecord]


def deploy_params(record: ModelRecord, base_url: str) -> DeployParams:
    """The ``deploy`` task's params for ``record``, fetched from the coordinator's blob route
    (:class:`~lepton.protocol.tasks.DeployParams`, which the agent's handler decodes)."""
    if record.format not in DEPLOYABLE_FORMATS:
        raise DeployError(f"{record.name} v{record.version} is {record.format}")
    fmt: Literal["onnx", "tflite"] = "onnx" if record.format == "onnx" else "tflite"
    blob = routes.path(routes.BLOB, digest=record.digest)
    return DeployParams(
        name=record.name,
        digest=record.digest,
        size=record.size,
        url=f"{base_url.rstrip('/')}{blob}",
        format=fmt,
        precision=record.precision,
    )


def resolve_model(
    registry: ModelRegistry,
    name: str,
    version: int | None = None,
    *,
    precision: str | None = None,
) -> ModelRecord:
    """The version to deploy: ``version``, else the latest servable one (of ``precision``).

    :class:`NotFoundError` when there is none, :class:`DeployError` when ``version`` is a
    format devices cannot serve."""
    if version is not None:
        record = registry.get(name, version)
        if precision is not None and record.precision != precision:
            raise NotFoundError("model", f"{name}@{version} ({precision})")
        if record.format not in DEPLOYABLE_FORMATS:
            raise DeployError(
                f"{name} v{version} is {record.format}; devices serve "
                + " or ".join(DEPLOYABLE_FORMATS)
            )
        return record
    servable = [
        r
        for r in registry.list(name)
        if r.format in DEPLOYABLE_FORMATS and (precision is None or r.precision == precision)
    ]
    if not servable:
        what = f"{name} ({precision}, servable)" if precision else f"{name} (servable)"
        raise NotFoundError("model", what)
    return servable[-1]


def select_devices(
    devices: DeviceRepo, selector: DeviceSelector, *, fleet: str
) -> list[DeviceRecord]:
    """The fleet's devices ``selector`` chooses, by id; :class:`NotFoundError` for a named id
    that does not exist, :class:`DeployError` when none is chosen."""
    if len(selector.device_ids) > MAX_DEVICE_IDS:
        raise DeployError(f"at most {MAX_DEVICE_IDS} device ids")
    if selector.device_ids:
        named = []
        for device_id in dict.fromkeys(selector.device_ids):
            device = devices.get_device(device_id)
            if device.fleet != fleet:
                raise NotFoundError("device", device_id)
            named.append(device)
        chosen = [d for d in named if selector.matches(d)]
    else:
        chosen = [d for d in _online(devices, fleet) if selector.matches(d)]
    if not chosen:
        raise DeployError(f"no device matches {selector.describe()}")
    return sorted(chosen, key=lambda d: d.id)


def _online(devices: DeviceRepo, fleet: str) -> list[DeviceRecord]:
    online: list[DeviceRecord] = []
    while True:
        page = devices.list_devices(state="online", fleet=fleet, limit=_PAGE, offset=len(online))
        online += page
        if len(page) < _PAGE:
            return online


def plan(
    cfg: Config,
    record: ModelRecord,
    devices: Sequence[DeviceRecord],
    *,
    base_url: str,
    max_attempts: int | None = None,
    expires_in_s: float | None = None,
    now: float | None = None,
) -> list[NewTask]:
    """One validated ``deploy`` task per device, pinned to it."""
    now = time.time() if now is None else now
    params = encode_params(KIND, deploy_params(record, base_url))
    return [
        build_task(
            cfg,
            TaskRequest(
                kind=KIND,
                params=params,
                demand_gops=DEMAND_GOPS,
                input_bytes=record.size,
                device_id=device.id,
                max_attempts=max_attempts,
                expires_in_s=expires_in_s,
            ),
            now=now,
        )
        for device in devices
    ]


@dataclass(frozen=True, slots=True)
class Deployer:
    """Deploys registered models on one coordinator (used by the route, from its thread pool).

    ``base_url``: the address devices fetch blobs from (``http.public_url``, else the API's
    own). ``on_submit(n)``: after ``n`` tasks were stored (metrics, waking the scheduler)."""

    config: Config
    devices: DeviceRepo
    tasks: TaskRepo
    registry: ModelRegistry
    base_url: Callable[[], str]
    on_submit: Callable[[int], None] = lambda _n: None

    def deploy(
        self,
        name: str,
        version: int | None,
        selector: DeviceSelector,
        *,
        precision: str | None = None,
        max_attempts: int | None = None,
        expires_in_s: float | None = None,
    ) -> Deployment:
        record = resolve_model(self.registry, name, version, precision=precision)
        devices = select_devices(self.devices, selector, fleet=self.config.fleet)
        new = plan(
            self.config,
            record,
            devices,
            base_url=self.base_url(),
            max_attempts=max_attempts,
            expires_in_s=expires_in_s,
        )
        tasks = [self.tasks.submit(task) for task in new]
        self.on_submit(len(tasks))
        return Deployment(record, tasks)
