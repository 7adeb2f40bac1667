"""The report's figures, computed from the coordinator's task records (pure functions).

Task records are what ``GET /v1/tasks`` returns. Times: ``run`` is the device-side run time
(``finished_at - started_at``, both reported by the agent; a simulated device's compute is
stretched to its profile's speed), ``end_to_end`` is submission to finish (queueing,
placement, dispatch and run). ``host_sample_ms`` is the per-sample latency the ONNX Runtime
session measured on this machine, the same for every simulated class.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) with linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def spread(values: Sequence[float]) -> dict[str, float | None]:
    """p50, p95 and max of ``values``."""
    return {
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "max": max(values) if values else None,
    }


def _class_of(task: Mapping[str, Any], device_class: Mapping[str, str]) -> str:
    device = task.get("device_id")
    return device_class.get(device, "unknown") if device else "unplaced"


def _pooled_accuracy(outputs: Iterable[Mapping[str, Any]]) -> float | None:
    correct = labelled = 0
    for out in outputs:
        if out.get("labelled") and out.get("correct") is not None:
            correct += int(out["correct"])
            labelled += int(out["count"])
    return correct / labelled if labelled else None


def inference_figures(
    tasks: Sequence[Mapping[str, Any]], device_class: Mapping[str, str]
) -> dict[str, Any]:
    """Per device class: tasks, successes, accuracy, run and end-to-end times; and totals."""
    groups: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for t in tasks:
        groups[_class_of(t, device_class)].append(t)
    by_class: dict[str, Any] = {}
    for cls, group in sorted(groups.items()):
        ok = [t for t in group if t["state"] == "succeeded" and t.get("output")]
        by_class[cls] = {
            "tasks": len(group),
            "succeeded": len(ok),
            "failed": len(group) - len(ok),
            "devices": len({t["device_id"] for t in group if t.get("device_id")}),
            "accuracy": _pooled_accuracy(t["output"] for t in ok),
            "samples": sum(int(t["output"].get("count") or 0) for t in ok),
            "run_s": spread([t["finished_at"] - t["started_at"] for t in ok if t["started_at"]]),
            "end_to_end_s": spread([t["finished_at"] - t["created_at"] for t in ok]),
            "host_sample_ms": spread(
                [
                    t["output"]["latency_ms"]["sample"]["p50"]
                    for t in ok
                    if t["output"].get("latency_ms")
                ]
            ),
        }
    ok_all = [t for t in tasks if t["state"] == "succeeded" and t.get("output")]
    return {
        "tasks": len(tasks),
        "succeeded": len(ok_all),
        "failed": len(tasks) - len(ok_all),
        "accuracy": _pooled_accuracy(t["output"] for t in ok_all),
        "by_class": by_class,
        "errors": sorted({str(t.get("last_error")) for t in tasks if t["state"] != "succeeded"}),
    }


def _run_times(tasks: Iterable[Mapping[str, Any]]) -> list[float]:
    return [
        t["finished_at"] - t["started_at"]
        for t in tasks
        if t["state"] == "succeeded" and t.get("started_at") and t.get("finished_at")
    ]


def training_figures(
    tasks: Sequence[Mapping[str, Any]], device_class: Mapping[str, str]
) -> dict[str, Any]:
    """A federated job's ``train`` tasks per device class: how many, how they ended, local
    training time and the accuracy each device measured on its own data after training."""
    groups: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for t in tasks:
        groups[_class_of(t, device_class)].append(t)
    by_class = {}
    for cls, group in sorted(groups.items()):
        ok = [t for t in group if t["state"] == "succeeded" and t.get("output")]
        local = [
            float(t["output"]["accuracy"]) for t in ok if t["output"].get("accuracy") is not None
        ]
        by_class[cls] = {
            "tasks": len(group),
            "succeeded": len(ok),
            "failed": len(group) - len(ok),
            "run_s": spread(_run_times(group)),
            "train_s": spread([float(t["output"].get("train_s") or 0.0) for t in ok]),
            "examples": sum(int(t["output"].get("examples") or 0) for t in ok),
            "local_accuracy": sum(local) / len(local) if local else None,
        }
    return {
        "tasks": len(tasks),
        "succeeded": sum(t["state"] == "succeeded" for t in tasks),
        "by_class": by_class,
    }


def deploy_figures(
    tasks: Sequence[Mapping[str, Any]], device_class: Mapping[str, str]
) -> dict[str, Any]:
    """How many devices of each class now serve the model, bytes fetched, load times."""
    groups: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for t in tasks:
        groups[_class_of(t, device_class)].append(t)
    by_class = {
        cls: {
            "tasks": len(group),
            "succeeded": sum(t["state"] == "succeeded" for t in group),
            "run_s": spread(_run_times(group)),
        }
        for cls, group in groups.items()
    }
    ok = [t for t in tasks if t["state"] == "succeeded" and t.get("output")]
    return {
        "tasks": len(tasks),
        "succeeded": len(ok),
        "failed": len(tasks) - len(ok),
        "bytes_downloaded": sum(int(t["output"].get("bytes_downloaded") or 0) for t in ok),
        "load_s": spread([float(t["output"].get("load_s") or 0.0) for t in ok]),
        "by_class": dict(sorted(by_class.items())),
        "errors": sorted({str(t.get("last_error")) for t in tasks if t["state"] != "succeeded"}),
    }


def _chosen_and_next(explanation: Mapping[str, Any]) -> tuple[Any, Any]:
    cands = explanation.get("candidates") or []
    chosen = next((c for c in cands if c.get("chosen")), None)
    runner_up = next((c for c in cands if not c.get("chosen") and c.get("terms")), None)
    return chosen, runner_up


def placement_figures(
    tasks: Sequence[Mapping[str, Any]],
    device_class: Mapping[str, str],
    explanations: Mapping[str, Mapping[str, Any]],
) -> dict[str, Any]:
    """Where unpinned tasks went (per class and device, against the fleet's make-up) and why.

    From each task's recorded explanation: how often each class was among the devices the
    scheduler compared (the chosen one and the next best), the best expected completion it
    offered there, and one sample per class that got work, preferring a sample whose
    runner-up is of another class (it shows what tipped the choice).
    """
    placed = [t for t in tasks if t.get("device_id")]
    per_class = Counter(_class_of(t, device_class) for t in placed)
    fleet = Counter(device_class.values())
    per_device = Counter(str(t["device_id"]) for t in placed)
    methods: Counter[str] = Counter()
    compared: Counter[str] = Counter()
    best: dict[str, float] = {}
    samples: dict[str, dict[str, Any]] = {}
    for t in placed:
        explanation = (explanations.get(t["id"]) or {}).get("explanation")
        if not explanation:
            continue
        methods[str(explanation.get("method"))] += 1
        for cand in explanation.get("candidates") or []:
            cls = device_class.get(cand["device_id"], "unknown")
            compared[cls] += 1
            if cand.get("terms"):
                best[cls] = min(best.get(cls, math.inf), cand["terms"]["completion_s"])
        chosen, runner_up = _chosen_and_next(explanation)
        if chosen is None:
            continue
        cls = _class_of(t, device_class)
        other = runner_up is not None and device_class.get(runner_up["device_id"]) != cls
        if cls in samples and (samples[cls]["runner_up_other_class"] or not other):
            continue
        samples[cls] = {
            "task_id": t["id"],
            "device_id": t["device_id"],
            "device_class": cls,
            "method": explanation.get("method"),
            "chosen": chosen,
            "runner_up": runner_up,
            "runner_up_class": device_class.get(runner_up["device_id"]) if runner_up else None,
            "runner_up_other_class": other,
            "filtered_counts": explanation.get("filtered_counts") or {},
        }
    return {
        "tasks": len(tasks),
        "by_class": {
            cls: {
                "tasks": per_class.get(cls, 0),
                "devices": fleet[cls],
                "tasks_per_device": per_class.get(cls, 0) / fleet[cls] if fleet[cls] else 0.0,
                "share": per_class.get(cls, 0) / len(placed) if placed else 0.0,
                "compared": compared.get(cls, 0),
                "best_completion_s": best.get(cls),
            }
            for cls in sorted(fleet)
        },
        "by_device": dict(sorted(per_device.items())),
        "methods": dict(methods),
        "explained": sum(methods.values()),
        "samples": [samples[c] for c in sorted(samples)],
    }
