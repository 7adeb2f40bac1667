"""The final-model check (finding 4 of the hardening review): a job's final weights are
registered only if they score no worse than its starting weights and than the model last
registered under its name, on the job's evaluation set.

The job's runner runs for real (its database, blob store, model registry and metrics) on a
job whose rounds are over: it loads the final weights and the evaluation set as after a
restart, scores them with the real digits model and registers them, or says why not.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from lepton.coordinator.errors import NotFoundError
from lepton.coordinator.fl import tables
from lepton.coordinator.fl.jobs.admission import JobPolicy
from lepton.coordinator.fl.jobs.engine import FLEngine
from lepton.coordinator.fl.metrics import FLMetrics
from lepton.coordinator.fl.store import FLStore
from lepton.coordinator.model_registry.registry import ModelRegistry
from lepton.coordinator.scheduler import CostWeights, ThroughputEstimator
from lepton.coordinator.store import Store
from lepton.protocol.weights import encode_weights
from tests.coordinator.conftest import coordinator_config

MODEL = "lepton.models.digits:DigitsCNN"
EVAL = "digits-test.npz"
Arrays = dict[str, np.ndarray[Any, Any]]


@cache
def weights() -> dict[str, Arrays]:
    """The digits CNN untrained, and trained on 300 and 600 samples (about 9 %, 45 % and
    85 % on the test split): three models in a known order of quality, in about a second."""
    import torch
    from torch.nn import functional

    from lepton.models.data import digits_splits
    from lepton.models.digits import build_digits_cnn

    train = digits_splits(seed=0).train
    model = build_digits_cnn(0)
    init = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}

    def trained(n: int) -> Arrays:
        torch.manual_seed(0)
        net = build_digits_cnn(0)
        net.train()
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        x, y = torch.from_numpy(train.x[:n]), torch.from_numpy(train.y[:n])
        for _ in range(3):
            for idx in torch.randperm(n).split(16):  # type: ignore[no-untyped-call]
                opt.zero_grad()
                functional.cross_entropy(net(x[idx]), y[idx]).backward()  # type: ignore[no-untyped-call]
                opt.step()
        return {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}

    return {"untrained": init, "half": trained(300), "trained": trained(600)}


@dataclass
class Env:
    fl: FLStore
    registry: ModelRegistry
    engine: FLEngine
    prometheus: CollectorRegistry

    def put(self, arrays: Arrays) -> str:
        return self.registry.put_bytes(encode_weights(arrays, kind="weights", round=0))

    async def finish(self, name: str, start: str, final: str, **spec: Any) -> dict[str, Any]:
        """A one-round job named ``name`` that started from the weights ``start`` and
        ended with ``final`` runs to its end; its ``final_model``."""
        job_id = f"{name}-{uuid.uuid4().hex[:8]}"
        body = {
            "name": name,
            "model": MODEL,
            "data": "digits",
            "rounds": 1,
            "eval": EVAL,
            "final_format": "torch",
            **spec,
        }
        first, last = self.put(weights()[start]), self.put(weights()[final])
        self.fl.create_job(job_id, name, body, 0.0)
        self.fl.open_round(
            job_id,
            1,
            selected=["d1"],
            tokens={"d1": "hmac"},
            tasks={"d1": "t1"},
            selection={},
            base_digest=first,
            started_at=1.0,
            deadline=2.0,
        )
        assert self.fl.close_round(job_id, 1, state="closed", now=2.0, new_digest=last)
        self.fl.update_job(
            job_id,
            state="running",
            round=2,
            global_digest=last,
            tensors={k: list(v.shape) for k, v in weights()[final].items()},
        )
        await self.engine.runner(self.fl.get_job(job_id), lease=None).run()  # type: ignore[arg-type]
        job = self.fl.get_job(job_id)
        assert job.state == "done", job.error
        assert job.final_model is not None
        assert job.final_model["weights_digest"] == last
        return job.final_model

    def refusals(self) -> float:
        value = self.prometheus.get_sample_value(
            "lepton_fl_updates_screened_total", {"reason": "final_model_worse"}
        )
        return value or 0.0


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    from lepton.models.data import digits_splits

    test = digits_splits(seed=0).test
    np.savez(tmp_path / EVAL, x=test.x, y=test.y)
    cfg = coordinator_config(tmp_path, broker_port=1)
    store = Store.open(f"sqlite:///{tmp_path / 'c.db'}", sqlite_synchronous="normal")
    store.create_schema(tables.metadata)
    fl = FLStore(store.engine)
    registry = ModelRegistry(store.engine, tmp_path / "data")
    prometheus = CollectorRegistry()
    engine = FLEngine(
        cfg,
        fl,
        registry,
        FLMetrics(prometheus),
        devices=store.devices,
        tasks=store.tasks,
        results=store.results,
        cancels=store.cancels,
        base_url=lambda: "http://127.0.0.1:1",
        estimator=ThroughputEstimator,
        weights=CostWeights(),
        policy=JobPolicy.of(cfg),
    )
    yield Env(fl=fl, registry=registry, engine=engine, prometheus=prometheus)
    store.close()


async def test_a_final_model_worse_than_its_start_or_the_last_registered_is_not_registered(
    env: Env,
) -> None:
    # Worse than where the job started: the poisoned-round outcome of the review.
    final = await env.finish("digits", start="trained", final="untrained")
    assert final.get("registered") is False, final
    assert "below the starting weights'" in final["reason"]
    assert final["accuracy"] < 0.2
    with pytest.raises(NotFoundError):
        env.registry.get("digits")
    assert env.refusals() == 1

    # Better than its start, with nothing registered under the name yet: registered.
    final = await env.finish("digits", start="untrained", final="trained")
    assert (final["name"], final["version"]) == ("digits", 1)
    assert final["accuracy"] > 0.7
    v1 = env.registry.get("digits")
    assert v1.accuracy_fp32 == pytest.approx(final["accuracy"])

    # Better than its own start, worse than digits v1 (scored on the same set): refused.
    final = await env.finish("digits", start="untrained", final="half")
    assert final.get("registered") is False, final
    assert f"below digits v1's {v1.accuracy_fp32:.4f}" in final["reason"]
    assert env.registry.get("digits").version == 1
    assert env.refusals() == 2

    # The same job with the check off registers it: the check is what held it back.
    final = await env.finish("digits", start="untrained", final="half", final_check=False)
    assert (final["name"], final["version"]) == ("digits", 2)
    assert env.refusals() == 2
