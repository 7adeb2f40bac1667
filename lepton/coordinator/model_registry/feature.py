"""The model registry as a coordinator feature: its tables, and routes serving blobs by
content address, model metadata and deploying a model (see :mod:`lepton.coordinator.feature`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from fastapi import APIRouter
from sqlalchemy import MetaData

from lepton.coordinator.config import Config
from lepton.coordinator.feature import BaseFeature
from lepton.coordinator.model_registry import tables
from lepton.coordinator.model_registry.deploy import Deployer
from lepton.coordinator.model_registry.grants import BlobGrants
from lepton.coordinator.model_registry.registry import ModelRegistry
from lepton.coordinator.model_registry.routes import make_router
from lepton.coordinator.store import Store


class ModelRegistryFeature(BaseFeature):
    """Models and blobs on the coordinator's database and data directory. ``base_url``:
    where devices fetch blobs; ``on_submit(n)``: ``n`` deploy tasks were submitted (any
    thread); ``on_auth_refusal(reason)``: a device was refused a blob (a metric)."""

    name = "models"

    def __init__(
        self,
        config: Config,
        store: Store,
        data_dir: str | os.PathLike[str],
        *,
        base_url: Callable[[], str],
        on_submit: Callable[[int], None],
        on_auth_refusal: Callable[[str], None] = lambda _reason: None,
    ) -> None:
        #: The registry (other features store their blobs here: federated jobs).
        self.registry = ModelRegistry(store.engine, data_dir, create_tables=False)
        self.grants = BlobGrants(store.engine)
        self.on_auth_refusal = on_auth_refusal
        self.deployer = Deployer(
            config, store.devices, store.tasks, self.registry, base_url, on_submit
        )

    @property
    def metadata(self) -> MetaData:
        return tables.metadata

    def routers(self) -> Sequence[APIRouter]:
        return [
            make_router(
                self.registry, self.deployer, grants=self.grants, on_refused=self.on_auth_refusal
            )
        ]
