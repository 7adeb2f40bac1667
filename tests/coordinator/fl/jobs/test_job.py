"""Federated job specs: one validated value from TOML or JSON; unknown keys are named."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lepton.coordinator.fl.jobs.spec import FLJob, JobError
from lepton.coordinator.fl.kernels.strategies import CentralDP, Clipping, FedProx

REPO = Path(__file__).resolve().parents[4]
BASE: dict[str, Any] = {
    "name": "digits",
    "model": "lepton.models.digits:DigitsCNN",
    "data": "digits",
}


def test_example_file_loads_and_round_trips() -> None:
    job = FLJob.from_toml(REPO / "deploy" / "fl-digits.example.toml")
    assert job.name == "digits-fl"
    assert job.strategy.name == "fedavgm"
    assert job.compression == "int8"
    assert FLJob.from_mapping(job.to_dict()) == job


def test_late_updates_spec() -> None:
    assert FLJob.from_mapping(BASE).late.policy == "drop"
    job = FLJob.from_mapping({**BASE, "late": {"policy": "fold", "max_rounds": 3}})
    assert (job.late.policy, job.late.max_rounds, job.late.exponent) == ("fold", 3, 0.5)
    assert job.late.weight(0) == 1.0
    assert job.late.weight(1) == pytest.approx(2**-0.5)  # FedBuff's 1/sqrt(1 + s)
    assert job.late.weight(3) == pytest.approx(0.5)
    assert FLJob.from_mapping(job.to_dict()) == job


def test_defaults_and_derived_values() -> None:
    job = FLJob.from_mapping(BASE)
    assert job.rounds == 10
    assert job.selection == "cost"
    assert job.needed == 1  # fedavg aggregates a single update
    krum = FLJob.from_mapping({**BASE, "strategy": {"name": "krum", "num_byzantine": 2}})
    assert krum.needed == 7  # n >= 2f + 3


@pytest.mark.parametrize(
    ("patch", "key"),
    [
        ({"epochz": 1}, "epochz"),
        ({"lr": 0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"rounds": True}, "rounds"),
        ({"compression": "int4"}, "compression"),
        ({"selection": "fastest"}, "selection"),
        ({"name": "bad name"}, "name"),
        ({"model": "not-an-import-path"}, "model"),
        ({"min_results": 11, "clients_per_round": 10}, "min_results"),
        ({"strategy": {"name": "fedfoo"}}, "strategy.name"),
        ({"strategy": {"name": "fedprox", "muu": 0.1}}, "strategy"),
        (
            {"strategy": {"name": "krum", "num_byzantine": 2}, "clients_per_round": 5},
            "clients_per_round",
        ),
        ({"fairness": {"max_stale": 3}}, "fairness.max_stale"),
        ({"late": {"policy": "keep"}}, "late.policy"),
        ({"late": {"policy": "fold", "max_rounds": 0}}, "late.max_rounds"),
        ({"late": {"exponent": -1}}, "late.exponent"),
        ({"late": {"staleness": 2}}, "late.staleness"),
        (
            {"late": {"policy": "fold"}, "dp": {"noise_multiplier": 1.0, "clip_norm": 1.0}},
            "late.policy",
        ),
        ({"dp": {"noise_multiplier": 1.0}}, "dp.clip_norm"),
        ({"dp": {"noise_multiplier": 1.0, "clip_norm": 0}}, "dp.clip_norm"),
        ({"input_shape": [1, 0]}, "input_shape"),
        ({"initial_weights": "ab" * 31}, "initial_weights"),
        ({"initial_weights": "AB" * 32}, "initial_weights"),
    ],
)
def test_bad_specs_name_the_key(patch: dict[str, Any], key: str) -> None:
    with pytest.raises(JobError) as info:
        FLJob.from_mapping({**BASE, **patch})
    assert info.value.key == key


def test_required_keys() -> None:
    with pytest.raises(JobError, match="data: is required"):
        FLJob.from_mapping({"name": "x", "model": "a:b"})


def test_strategy_wrappers() -> None:
    prox = FLJob.from_mapping({**BASE, "strategy": {"name": "fedprox", "mu": 0.1}})
    assert isinstance(prox.build_strategy(), FedProx)
    clipped = FLJob.from_mapping({**BASE, "strategy": {"name": "median", "clip_norm": 2.0}})
    assert isinstance(clipped.build_strategy(), Clipping)
    private = FLJob.from_mapping({**BASE, "dp": {"noise_multiplier": 0.8, "clip_norm": 1.0}})
    strategy = private.build_strategy()
    assert isinstance(strategy, CentralDP)
    assert strategy.expected_clients == private.clients_per_round


def test_toml_text_and_errors(tmp_path: Path) -> None:
    text = 'name = "a"\nmodel = "m:f"\ndata = "d"\n[strategy]\nname = "trimmed_mean"\nbeta = 0.1\n'
    job = FLJob.from_toml(text)
    assert job.strategy.knobs == {"beta": 0.1}
    with pytest.raises(JobError, match="not valid TOML"):
        FLJob.from_toml("name = ")
    with pytest.raises(JobError, match="cannot read"):
        FLJob.from_toml(tmp_path / "missing.toml")
