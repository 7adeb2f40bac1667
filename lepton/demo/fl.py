"""The demo's federated stage, through the coordinator's FL API (``/v1/fl/jobs``).

A coordinator without the FL API (404 on ``/v1/fl/jobs``) is reported as such: the stage
is "not run", with the reason, and nothing is made up.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from lepton.demo.api import Api, DemoError
from lepton.protocol import routes
from lepton.protocol.tasks import TRAIN

JOBS_PATH: Final = routes.FL_JOBS
DONE_STATES: Final = frozenset({"done"})
FAILED_STATES: Final = frozenset({"failed", "stopped"})


@dataclass(frozen=True, slots=True, kw_only=True)
class JobRequest:
    """The demo's federated job: FedAvg over the devices' ``digits`` partitions."""

    rounds: int
    clients_per_round: int
    epochs: int
    eval_path: Path
    initial_weights: str | None = None  # digest of a weights blob to start from
    seed: int = 0
    lr: float = 0.1
    batch_size: int = 16
    deadline_s: float = 60.0
    name: str = "digits-fl"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the stage reports: figures for the report, the final FP32 model file (None when
    the stage did not produce one) and a one-line summary."""

    figures: dict[str, Any]
    model_path: Path | None = None
    summary: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def unavailable(api: Api) -> str | None:
    """Why the coordinator cannot run FL jobs, or None when it can."""
    if api.request("GET", JOBS_PATH, ok404=True) is None:
        return "the coordinator has no federated learning API (GET /v1/fl/jobs: 404)"
    return None


def job_body(req: JobRequest) -> dict[str, Any]:
    """The POST body (the layout of :class:`lepton.coordinator.fl.jobs.spec.FLJob`)."""
    return {
        "name": req.name,
        "model": "lepton.models.digits:DigitsCNN",
        "data": "digits",
        "rounds": req.rounds,
        "clients_per_round": req.clients_per_round,
        "epochs": req.epochs,
        "batch_size": req.batch_size,
        "lr": req.lr,
        "compression": "int8",
        "deadline_s": req.deadline_s,
        "eval": str(req.eval_path),
        "seed": req.seed,
        "strategy": {"name": "fedavg"},
        "initial_weights": req.initial_weights,
    }


def round_figures(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Closed rounds as the job reports them: accuracy and loss on the central test set."""
    return [
        {
            "round": r["round"],
            "selected": r.get("selected"),
            "updates": r.get("accepted"),
            "rejected": r.get("rejected"),
            "accuracy": r.get("accuracy"),
            "loss": r.get("loss"),
            "seconds": r.get("wall_s"),
            "bytes_up": r.get("bytes_up"),
            "devices": r.get("devices"),
        }
        for r in history
        if r.get("state") == "closed"
    ]


def run_job(
    api: Api,
    req: JobRequest,
    *,
    timeout: float,
    on_round: Callable[[int, str], None],
    check: Callable[[], None],
    blob_path: Callable[[str], Path],
) -> Outcome:
    """Submit the job, follow it round by round, and return its figures and final model."""
    why = unavailable(api)
    if why is not None:
        return Outcome({"status": "not_run", "reason": why})
    body = job_body(req)
    job = api.post(JOBS_PATH, body)
    job_id = str(job["id"])
    deadline = time.monotonic() + timeout
    while True:
        job = api.get(f"{JOBS_PATH}/{job_id}")
        state = str(job.get("state"))
        rounds = round_figures(job.get("history") or [])
        last = rounds[-1] if rounds else None
        detail = f"round {job.get('round')}/{req.rounds} {state}"
        if last is not None and last["accuracy"] is not None:
            detail += f", accuracy after round {last['round']}: {last['accuracy']:.1%}"
        on_round(len(rounds), detail)
        if state in DONE_STATES or state in FAILED_STATES:
            break
        if time.monotonic() > deadline:
            api.post(f"{JOBS_PATH}/{job_id}/stop", {})
            raise DemoError(f"federated job {job_id} still {state} after {timeout:g}s")
        check()
        time.sleep(0.5)
    final = job.get("final_model")
    train = [t for t in api.tasks(TRAIN) if (t.get("params") or {}).get("job") == job_id]
    figures: dict[str, Any] = {
        "status": state,
        "job_id": job_id,
        "request": body,
        "rounds": rounds,
        "final_model": final,
        "final_accuracy": (final or {}).get("accuracy"),
        "error": job.get("error"),
        "_train_tasks": train,
    }
    if state not in DONE_STATES or not final:
        figures["reason"] = f"the job ended {state}: {job.get('error') or 'no final model'}"
        return Outcome(figures)
    acc = figures["final_accuracy"]
    summary = (
        f"{len(rounds)} rounds, {sum(r['updates'] or 0 for r in rounds)} updates; "
        f"final model {final['name']} v{final['version']}"
        + (f", test accuracy {acc:.1%}" if acc is not None else "")
    )
    figures["summary"] = summary
    return Outcome(figures, model_path=blob_path(str(final["digest"])), summary=summary)
