"""The demo's federated stage against a stand-in API: absent FL API, a finished job."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

from lepton.demo import fl
from lepton.demo.api import Api

REQUEST = fl.JobRequest(
    rounds=2,
    clients_per_round=3,
    epochs=1,
    eval_path=Path("/data/test.npz"),
    initial_weights="a" * 64,
)


def api_with(handler: Any) -> Api:
    api = Api("http://coordinator")
    api._http = httpx.Client(base_url="http://coordinator", transport=httpx.MockTransport(handler))
    return api


def test_absent_fl_api_is_reported_as_not_run() -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(f"{request.method} {request.url.path}")
        return httpx.Response(404, json={"detail": "Not Found"})

    outcome = fl.run_job(
        api_with(handler),
        REQUEST,
        timeout=5,
        on_round=lambda *_: None,
        check=lambda: None,
        blob_path=Path,
    )
    assert outcome.model_path is None
    assert outcome.figures["status"] == "not_run"
    assert "404" in outcome.figures["reason"]
    assert calls == ["GET /v1/fl/jobs"]  # nothing was submitted


def test_finished_job_gives_rounds_and_the_final_model() -> None:
    posted: list[dict[str, Any]] = []
    history = [
        {
            "round": 1,
            "state": "closed",
            "accepted": 3,
            "selected": 4,
            "accuracy": 0.8,
            "loss": 0.6,
            "wall_s": 2.0,
        },
        {
            "round": 2,
            "state": "closed",
            "accepted": 3,
            "selected": 4,
            "accuracy": 0.9,
            "loss": 0.4,
            "wall_s": 1.5,
        },
    ]
    final = {"name": "digits-fl", "version": 1, "digest": "b" * 64, "accuracy": 0.9}
    polls = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "POST" and path == "/v1/fl/jobs":
            posted.append(json.loads(request.content))
            return httpx.Response(201, json={"id": "digits-fl-1", "state": "pending"})
        if path == "/v1/fl/jobs":
            return httpx.Response(200, json=[])
        if path == "/v1/fl/jobs/digits-fl-1":
            polls["n"] += 1
            done = polls["n"] > 1
            return httpx.Response(
                200,
                json={
                    "id": "digits-fl-1",
                    "state": "done" if done else "running",
                    "round": 3 if done else 2,
                    "history": history if done else history[:1],
                    "final_model": final if done else None,
                },
            )
        if path == "/v1/tasks":
            return httpx.Response(200, json=[{"id": "t", "params": {"job": "digits-fl-1"}}])
        return httpx.Response(404)

    seen: list[tuple[int, str]] = []
    outcome = fl.run_job(
        api_with(handler),
        REQUEST,
        timeout=30,
        on_round=lambda r, d: seen.append((r, d)),
        check=lambda: None,
        blob_path=lambda d: Path("/blobs") / d,
    )
    (body,) = posted
    assert body["initial_weights"] == "a" * 64
    assert body["rounds"] == 2
    assert body["eval"] == "/data/test.npz"
    assert outcome.model_path == Path("/blobs") / ("b" * 64)
    assert [r["accuracy"] for r in outcome.figures["rounds"]] == [0.8, 0.9]
    assert outcome.figures["final_accuracy"] == 0.9
    assert outcome.figures["_train_tasks"] == [{"id": "t", "params": {"job": "digits-fl-1"}}]
    assert seen[0][0] == 1
    assert "accuracy after round 1: 80.0%" in seen[0][1]
