"""Who trains in a round: eligibility through the cost model's filters, expected round
times, and selection by cost (with fairness) or at random."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest

from lepton.coordinator.fl.jobs import planning
from lepton.coordinator.fl.jobs.spec import FLJob
from lepton.coordinator.fl.kernels.selection import Candidate
from lepton.coordinator.scheduler import CostModel, CostWeights, DeviceState, ThroughputEstimator

SHAPE = planning.RoundShape(weights_bytes=30_000, update_bytes=8_000, flops_per_example=1e8)


def job(**kw: object) -> FLJob:
    base: dict[str, object] = {
        "name": "digits",
        "model": "lepton.models.digits:DigitsCNN",
        "data": "digits",
        "clients_per_round": 2,
        "over_select": 0.5,
        "epochs": 2,
    }
    base.update(kw)
    return FLJob.from_mapping(base)


def device(name: str, gflops: float, **kw: object) -> DeviceState:
    fields: dict[str, object] = {
        "device_id": name,
        "fp32_gflops": gflops,
        "runtimes": frozenset({"onnxruntime", "torch"}),
        "data_sources": frozenset({"digits"}),
        "slots_total": 1,
    }
    fields.update(kw)
    return DeviceState(**fields)  # type: ignore[arg-type]


def model() -> CostModel:
    return CostModel(CostWeights(), ThroughputEstimator())


def test_eligibility_follows_the_cost_models_filters() -> None:
    devices = [
        device("fast", 60.0),
        device("slow", 6.0),
        device("no-torch", 60.0, runtimes=frozenset({"onnxruntime"})),
        device("no-data", 60.0, data_sources=frozenset()),
        device("hot", 60.0, throttled=True),
        device("flat", 60.0, battery_percent=5.0, plugged=False),
        device("gone", 60.0, online=False),
    ]
    cands, why = planning.candidates(job(), SHAPE, devices, model(), examples={}, history={})
    assert sorted(c.device_id for c in cands) == ["fast", "slow"]
    assert why == {
        "no-torch": "runtime",
        "no-data": "data",
        "hot": "thermal",
        "flat": "battery",
        "gone": "offline",
    }
    by = {c.device_id: c.expected_s for c in cands}
    assert by["slow"] > 5 * by["fast"]  # compute dominates: about 10x slower


def test_expected_time_grows_with_reported_examples_and_epochs() -> None:
    d = [device("a", 10.0), device("b", 10.0)]
    cands, _ = planning.candidates(
        job(), SHAPE, d, model(), examples={"a": 1000, "b": 10}, history={}
    )
    by = {c.device_id: c.expected_s for c in cands}
    assert by["a"] > by["b"]
    assert planning.demand_gops(job(epochs=4), 100, 1e6) == pytest.approx(4e-1)
    assert planning.demand_gops(job(max_examples=10), 100, 1e6) == pytest.approx(2e-2)


def test_cost_selection_prefers_fast_devices_random_does_not_care() -> None:
    devices = [device(f"fast{i}", 60.0) for i in range(4)] + [
        device(f"slow{i}", 6.0) for i in range(4)
    ]
    cands, _ = planning.candidates(job(), SHAPE, devices, model(), examples={}, history={})
    picked = planning.choose(
        job(fairness={"max_staleness": None}), cands, 2, np.random.default_rng(0)
    )
    assert len(picked.devices) == 3  # ceil(2 * 1.5)
    assert all(d.startswith("fast") for d in picked.devices)
    slow_picks = 0
    for seed in range(20):
        rnd = planning.choose(job(selection="random"), cands, 2, np.random.default_rng(seed))
        assert len(rnd.devices) == 3
        slow_picks += sum(d.startswith("slow") for d in rnd.devices)
    assert slow_picks > 10


def test_fairness_brings_in_devices_left_out() -> None:
    devices = [device(f"fast{i}", 60.0) for i in range(4)] + [device("slow", 6.0)]
    history = planning.participation([(1, ["fast0", "fast1", "fast2"]), (2, ["fast0", "fast1"])], 3)
    assert history == {"fast0": (2, 1), "fast1": (2, 1), "fast2": (1, 2)}
    cands, _ = planning.candidates(job(), SHAPE, devices, model(), examples={}, history=history)
    picked = planning.choose(
        job(fairness={"max_staleness": 2, "max_forced_share": 0.5}),
        cands,
        2,
        np.random.default_rng(0),
    )
    assert picked.forced  # never chosen: chosen first
    assert picked.forced[0] in ("fast3", "slow")


def test_a_device_still_training_for_the_job_is_not_forced_in_again() -> None:
    devices = [device(f"fast{i}", 60.0) for i in range(4)] + [device("slow", 6.0)]
    rounds = [(1, ["fast0", "slow"]), (2, ["fast1", "fast2"]), (3, ["fast3", "fast0"])]
    fairness = job(fairness={"max_staleness": 3, "max_forced_share": 0.5})

    def forced(working: tuple[str, ...]) -> list[str]:
        history = planning.participation(rounds, 4, working=working)
        cands, _ = planning.candidates(job(), SHAPE, devices, model(), examples={}, history=history)
        return planning.choose(fairness, cands, 2, np.random.default_rng(0)).forced

    assert planning.participation(rounds, 4, working=("slow",))["slow"] == (1, 0)
    assert "slow" in forced(())  # left out 3 rounds: the floor asks it
    assert "slow" not in forced(("slow",))  # still on its round-1 task: not asked again


def test_train_params_are_what_the_agent_takes() -> None:
    from lepton.protocol.tasks import TrainParams, WeightsRef, params_as

    j = job(max_examples=50, strategy={"name": "fedprox", "mu": 0.1})
    params = planning.train_params(
        j,
        "digits-1",
        4,
        "dev",
        weights=WeightsRef(digest="a" * 64, size=10, url="http://c/v1/blobs/" + "a" * 64),
        upload_url="http://c/v1/fl/uploads/digits-1/4/dev?token=t",
        strategy_knobs=j.build_strategy().configure_fit(4),
    )
    assert (params.round, params.prox_mu, params.max_examples) == (4, 0.1, 50)
    assert planning.seed_for(j, 4, "dev") == params.seed
    assert planning.task_id("digits-1", 4, "dev") == planning.task_id("digits-1", 4, "dev")
    assert planning.task_id("digits-1", 4, "dev") != planning.task_id("digits-1", 5, "dev")
    assert isinstance(params, TrainParams)
    assert (
        params_as(
            TrainParams,
            planning.train_request(
                j, SHAPE, 100, params, task_id="t", device_id="dev", expires_in_s=60
            ).params,
        )
        == params
    )


def test_a_coordinator_built_train_task_decodes_on_the_agent() -> None:
    """From the round's plan to the agent's handler: the request, the stored task, the
    dispatched message with the slot's credential sealed in, over the codec, into the
    agent's ``train`` params."""
    import time

    from lepton.agent.training.tasks import _params
    from lepton.coordinator.config import load
    from lepton.coordinator.fl.credentials import UploadSigner
    from lepton.coordinator.tasks.submit import build_task
    from lepton.protocol import codec
    from lepton.protocol.messages import Task
    from lepton.protocol.tasks import TRAIN, TrainParams, WeightsRef

    j = job(max_examples=50)
    tid = planning.task_id("digits-1", 4, "dev")
    params = planning.train_params(
        j,
        "digits-1",
        4,
        "dev",
        weights=WeightsRef(digest="b" * 64, size=1000, url="http://c/v1/blobs/" + "b" * 64),
        upload_url="http://c/v1/fl/uploads/digits-1/4/dev",
        strategy_knobs={},
    )
    request = planning.train_request(
        j, SHAPE, 100, params, task_id=tid, device_id="dev", expires_in_s=60
    )
    stored = build_task(load(env={}, overrides={}), request)
    assert (stored.kind, stored.pinned_device, stored.max_attempts) == (TRAIN, "dev", 1)
    message = Task(task_id=tid, kind=stored.kind, params=stored.params, expires_at=time.time() + 60)
    sealed = UploadSigner(b"k" * 32).seal(message, "dev")
    received = codec.decode(codec.encode(sealed), Task)
    on_agent = _params(received.params, TrainParams)
    assert on_agent.upload.token == UploadSigner(b"k" * 32).token("digits-1", 4, "dev")
    assert msgspec.structs.replace(on_agent, upload=params.upload) == params


def test_a_device_busy_with_the_job_is_expected_to_finish_after_its_backlog() -> None:
    """The job's earlier task a device still holds delays its next one: the backlog is the
    latest expected end of those tasks (each estimate counted the wait before it)."""
    now = 1000.0
    backlog = planning.backlog_s(
        {
            "slow0": [(990.0, 40.0), (995.0, 65.0)],  # ends at 1030 and 1060
            "slow1": [(900.0, 30.0)],  # overran its estimate: ends "now"
            "slow2": [(990.0, None)],  # no estimate recorded
        },
        now,
    )
    assert backlog == {"slow0": 60.0, "slow1": 0.0, "slow2": 0.0}
    devices = [device(f"fast{i}", 60.0) for i in range(2)] + [
        device("slow0", 6.0),
        device("slow3", 6.0),
    ]
    j = job(fairness={"max_staleness": None})
    idle, _ = planning.candidates(j, SHAPE, devices, model(), examples={}, history={})
    busy, _ = planning.candidates(
        j, SHAPE, devices, model(), examples={}, history={}, backlog=backlog
    )
    before = {c.device_id: c.expected_s for c in idle}
    after = {c.device_id: c.expected_s for c in busy}
    assert after["slow0"] == pytest.approx(before["slow0"] + 60.0, rel=0.05)
    assert after["slow3"] == before["slow3"]
    # Two updates needed, three asked: the third is the slow device without a backlog, for
    # every tie-break.
    for seed in range(5):
        picked = planning.choose(j, busy, 2, np.random.default_rng(seed))
        assert sorted(picked.devices) == ["fast0", "fast1", "slow3"]


def test_a_job_folding_late_updates_does_not_ask_devices_it_could_not_count() -> None:
    """Rounds of ~1 s (the 2nd fastest of 3 asked): a 5 s device counts within a window of 8
    rounds, a 40 s one does not; near the job's end the window shrinks to what is left."""
    cands = [
        Candidate(device_id="fast0", expected_s=1.0),
        Candidate(device_id="fast1", expected_s=1.0),
        Candidate(device_id="pi", expected_s=5.0),
        Candidate(device_id="pi-slow", expected_s=40.0),
    ]
    folds = job(rounds=20, late={"policy": "fold", "max_rounds": 8})
    assert planning.past_the_job(folds, cands, 2, round_no=1) == {"pi-slow"}
    assert planning.past_the_job(folds, cands, 2, round_no=17) == {"pi-slow", "pi"}  # 3 left
    assert planning.past_the_job(folds, cands, 2, round_no=16) == {"pi-slow"}  # 4 left: 5 s
    assert planning.past_the_job(job(rounds=20), cands, 2, round_no=17) == set()  # drops late
    assert planning.past_the_job(folds, cands[:2], 2, round_no=20) == set()  # want stay


def test_reported_sizes_are_read_for_the_jobs_data_source_only() -> None:
    from types import SimpleNamespace
    from typing import Any, cast

    rows = [
        SimpleNamespace(id="a", report={"data_sizes": {"digits": 180, "cam": 9}}),
        SimpleNamespace(id="b", report={"data_sizes": {"cam": 9}}),  # not for this source
        SimpleNamespace(id="c", report={"data_sources": ["digits"]}),  # an older agent
        SimpleNamespace(id="d", report=None),
        SimpleNamespace(id="e", report={"data_sizes": {"digits": True}}),  # not a count
        SimpleNamespace(id="f", report={"data_sizes": {"digits": 0}}),
    ]
    assert planning.reported_sizes(cast(Any, rows), "digits") == {"a": 180, "f": 0}
