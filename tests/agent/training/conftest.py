"""Fixtures for the training handler tests: a digits partition, global weights, servers."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lepton.agent.handlers import TaskContext, TaskServices
from lepton.agent.inference.manager import ModelManager
from lepton.agent.training.datasources import ArraySource, DataSources
from lepton.protocol.imports import Allowlist
from lepton.protocol.messages import Task
from lepton.protocol.weights import encode_weights
from tests.support.httpserver import HttpServer

CNN = "lepton.models.digits:DigitsCNN"
MLP = "tests.agent.training.nets:digits_mlp"
#: What these tests' agent allows as model factories: the reference models, the test nets
#: and one module that does not exist (to see an import fail).
ALLOWED = Allowlist(("lepton.models.*", "tests.agent.training.nets", "no.such.module"))


@dataclass(frozen=True)
class Partition:
    x: np.ndarray
    y: np.ndarray


@pytest.fixture(scope="session")
def partition() -> Partition:
    """One device's label-skewed share of the digits training split (~300 samples)."""
    from lepton.models.data import digits_splits, dirichlet_partition

    train = digits_splits().train
    parts = dirichlet_partition(train.y, 4, alpha=1.0, seed=0, min_size=200)
    idx = parts[0][:320]
    return Partition(x=train.x[idx], y=train.y[idx])


def initial_weights(factory: str, seed: int = 0) -> dict[str, np.ndarray]:
    import torch

    from lepton.agent.training import trainer as torchtrain

    torch.manual_seed(seed)
    model = torchtrain.factory(factory, allow=ALLOWED)()
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@dataclass
class Servers:
    blobs: HttpServer
    uploads: HttpServer

    def weights(self, factory: str, seed: int = 0) -> dict[str, Any]:
        """Serve ``factory``'s initial weights; the ``weights`` param pointing at them."""
        blob = encode_weights(initial_weights(factory, seed), kind="weights", round=0)
        digest = self.blobs.add(blob)
        return {"digest": digest, "size": len(blob), "url": self.blobs.url(digest)}


@pytest.fixture(scope="module")
def _servers() -> Iterator[Servers]:
    # Shared by a module's tests: stopping a server waits out its 0.5 s poll interval.
    with HttpServer() as blobs, HttpServer() as uploads:
        yield Servers(blobs, uploads)


@pytest.fixture
def servers(_servers: Servers) -> Servers:
    """The module's servers with no faults queued and no requests recorded."""
    _servers.blobs.reset()
    _servers.uploads.reset()
    return _servers


@pytest.fixture
def ctx(tmp_path: Path, partition: Partition) -> TaskContext:
    sources = DataSources()
    sources.add("digits", ArraySource(partition.x, partition.y))
    sources.add("unlabelled", ArraySource(partition.x))
    store = ModelManager(tmp_path / "weights", retries=3, timeout=5.0, backoff=(0.01, 0.05))
    return TaskContext(
        device_id="dev1",
        state_dir=tmp_path,
        agent_version="test",
        services=TaskServices(
            data_sources=sources, weights_store=store, train_threads=1, model_imports=ALLOWED
        ),
    )


def task(kind: str, **params: Any) -> Task:
    return Task(task_id=f"t-{kind}", kind=kind, params=params, expires_at=time.time() + 60)


def train_params(servers: Servers, factory: str = CNN, **overrides: Any) -> dict[str, Any]:
    factory = overrides.get("model", factory)
    params: dict[str, Any] = {
        "job": "digits-fl",
        "round": 3,
        "model": factory,
        "weights": servers.weights(factory),
        "data": "digits",
        "epochs": 2,
        "batch_size": 32,
        "lr": 0.05,
        "optimizer": "sgd",
        "momentum": 0.9,
        "prox_mu": 0.0,
        "compression": "fp32",
        "upload": {"url": servers.uploads.upload_url("digits-fl/3/dev1")},
        "seed": 1,
    }
    params.update(overrides)
    return params
