"""What a submitted federated job may name on the coordinator, and hostile job bodies:
findings 1, 10 and 11 of the hardening review, on a running coordinator's HTTP API."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from lepton.coordinator.fl.jobs.admission import JobPolicy
from lepton.coordinator.fl.jobs.spec import FLJob, JobError
from lepton.coordinator.service import Coordinator
from lepton.protocol.imports import Allowlist
from tests.support.api import api_client

BASE: dict[str, Any] = {
    "name": "digits",
    "model": "lepton.models.digits:DigitsCNN",
    "data": "digits",
}
OUTSIDE = "a .npz evaluation set must be a file in the coordinator's evaluation directory"


@pytest.fixture
async def api(
    make_coordinator: Callable[..., contextlib.AbstractAsyncContextManager[Coordinator]],
) -> AsyncIterator[httpx.AsyncClient]:
    async with make_coordinator() as c, api_client(c) as client:
        yield client


def refusal(r: httpx.Response) -> tuple[int, list[str], str]:
    detail = r.json()["detail"][0]
    return r.status_code, detail["loc"], detail["msg"]


def test_policy_reads_strings_only_and_keeps_files_to_its_directory(tmp_path: Path) -> None:
    policy = JobPolicy(allow=Allowlist(("lepton.models.*",)), eval_dir=tmp_path)
    policy.admit(FLJob.from_mapping({**BASE, "eval": "digits-test.npz"}))
    policy.admit(FLJob.from_mapping({**BASE, "eval": str(tmp_path / "sub" / "t.npz")}))
    (tmp_path / "link.npz").symlink_to("/etc/hostname")
    for spec in ("/etc/passwd.npz", "../x.npz", "sub/../../x.npz", "link.npz"):
        with pytest.raises(JobError, match="evaluation directory") as err:
            policy.admit(FLJob.from_mapping({**BASE, "eval": spec}))
        assert err.value.key == "eval"
    for key, value in (("model", "os:abort"), ("model", "subprocess:run"), ("eval", "os:getcwd")):
        with pytest.raises(JobError, match="not_allowed") as err:
            policy.admit(FLJob.from_mapping({**BASE, key: value}))
        assert err.value.key == key


async def test_eval_sets_outside_the_directory_are_refused_alike(
    api: httpx.AsyncClient, tmp_path: Path
) -> None:
    """The answer does not say whether a file exists outside the evaluation directory."""
    present = tmp_path.parent / "present.npz"
    np.savez(present, x=np.zeros((2, 1, 8, 8), np.float32), y=np.zeros(2, np.int64))
    answers = set()
    for spec in (str(present), str(tmp_path.parent / "absent.npz"), "/etc/passwd.npz"):
        r = await api.post("/v1/fl/jobs", json={**BASE, "eval": spec})
        status, loc, msg = refusal(r)
        assert (status, loc) == (422, ["body", "eval"])
        assert OUTSIDE in msg
        answers.add(r.text)
    assert len(answers) == 1
    r = await api.post("/v1/fl/jobs", json={**BASE, "eval": str(tmp_path / "t.npz")})
    assert r.status_code == 201, r.text  # the test config's fl.eval_dir is tmp_path


@pytest.mark.parametrize(
    ("shape", "why"),
    [([1] * 9, "at most 8 dimensions"), ([100_000, 100_000], "at most 16777216 values")],
)
async def test_input_shape_is_bounded(api: httpx.AsyncClient, shape: list[int], why: str) -> None:
    status, loc, msg = refusal(await api.post("/v1/fl/jobs", json={**BASE, "input_shape": shape}))
    assert (status, loc) == (422, ["body", "input_shape"])
    assert why in msg


async def test_hostile_job_bodies_get_a_reason(api: httpx.AsyncClient) -> None:
    # A strategy nested 5,000 deep reset the connection: now a 400 naming the problem.
    deep = '{"name": "x", "model": "lepton.models.digits:DigitsCNN", "data": "d", "strategy": '
    deep += '{"a": ' * 5000 + "1" + "}" * 5000 + "}"
    r = await api.post("/v1/fl/jobs", content=deep, headers={"content-type": "application/json"})
    assert (r.status_code, r.json()["reason"]) == (400, "too_deep")
    # Parseable, but deeper than any job spec is.
    nested: Any = 1
    for _ in range(10):
        nested = {"k": nested}
    r = await api.post("/v1/fl/jobs", json={**BASE, "strategy": {"name": "fedavg", "x": nested}})
    status, loc, msg = refusal(r)
    assert (status, loc[:2]) == (422, ["body", "strategy"])
    assert "nested deeper than 4 levels" in msg
    # Too big, too many values, not an object.
    big = json.dumps({**BASE, "pad": "x" * (1 << 20)})
    r = await api.post("/v1/fl/jobs", content=big, headers={"content-type": "application/json"})
    assert (r.status_code, r.json()["reason"]) == (413, "too_large")
    wide = {**BASE, "strategy": {"name": "fedavg", "xs": list(range(5000))}}
    assert refusal(await api.post("/v1/fl/jobs", json=wide))[0] == 422
    assert refusal(await api.post("/v1/fl/jobs", json=[1, 2]))[:2] == (400, ["body", "body"])
    # The coordinator is still answering, and counted each refusal.
    metrics = (await api.get("/metrics")).text
    assert 'lepton_http_rejects_total{reason="too_deep"} 1.0' in metrics
    assert 'lepton_http_rejects_total{reason="too_large"} 1.0' in metrics
    assert 'lepton_fl_job_refusals_total{key="body"} 1.0' in metrics
    assert 'lepton_fl_job_refusals_total{key="strategy"} 1.0' in metrics
    assert 'lepton_fl_job_refusals_total{key="job"} 1.0' in metrics
