"""The demo's loop, stage by stage, through the coordinator's HTTP API and model registry.

broker -> coordinator -> fleet registers and reports -> central training -> INT8 through
the gate -> deploy (pinned to every device) -> inference (placed by the cost model) ->
federated rounds on the devices' data -> the improved model quantized -> redeployed ->
inference again. Every figure in the report is read back from what the coordinator
recorded (task records, results, explanations, FL job state), never from local guesses.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from lepton.common.errors import LeptonError
from lepton.coordinator.tasks.request import TaskRequest
from lepton.demo import fl, model, posture, release
from lepton.demo.api import Api, DemoError
from lepton.demo.broker import BrokerChoice
from lepton.demo.figures import (
    deploy_figures,
    inference_figures,
    placement_figures,
    training_figures,
)
from lepton.demo.release_kit import ReleaseKit
from lepton.demo.stack import Stack, StackSpec
from lepton.protocol.tasks import DEPLOY, INFER, InferParams, encode_params

log = logging.getLogger(__name__)

# (key, title) in the order they run.
STAGES: tuple[tuple[str, str], ...] = (
    ("broker", "MQTT broker"),
    ("coordinator", "Coordinator (SQLite)"),
    ("fleet", "Devices register and report"),
    ("train", "Central training (seed set)"),
    ("quantize", "INT8 quantization, accuracy gate"),
    ("deploy", "Deploy INT8 model"),
    ("infer", "Inference, placed by cost model"),
    ("federated", "Federated rounds on device data"),
    ("requantize", "Quantize improved model"),
    ("redeploy", "Redeploy improved model"),
    ("infer2", "Inference with improved model"),
    *release.STAGES,
)


class Reporter(Protocol):
    """Where the loop reports progress (the rich display, or nothing)."""

    def begin(self, stage: str, total: int | None = None, detail: str = "") -> None: ...
    def update(
        self, stage: str, completed: int | None = None, detail: str | None = None
    ) -> None: ...
    def end(self, stage: str, detail: str = "") -> None: ...
    def skip(self, stage: str, detail: str) -> None: ...
    def fail(self, stage: str, detail: str) -> None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoConfig:
    """One demo run. ``quick``: fewer tasks and rounds, for a test or a first look."""

    workdir: Path
    devices: int = 20
    rounds: int = 3
    quick: bool = False
    broker: BrokerChoice = "auto"
    seed: int = 0
    infer_per_device: int = 2
    central_samples: int = 128
    central_epochs: int = 15
    fl_epochs: int = 5
    clients_per_round: int | None = None  # None: half the fleet
    stage_timeout_s: float = 120.0
    host_gflops: float | None = None
    coordinator_settings: dict[str, Any] = field(default_factory=dict)
    # The release stages: a signed agent image rolled out in phases, a broken one aborted.
    releases: bool = True

    @property
    def clients(self) -> int:
        return self.clients_per_round or max(2, self.devices // 2)


class Demo:
    """Runs the stages on a :class:`Stack`; :attr:`figures` fills as they go."""

    def __init__(self, config: DemoConfig, reporter: Reporter) -> None:
        self.config = config
        self.r = reporter
        # The fleet pins the kit's trust root from its start, as devices are provisioned.
        self.kit = ReleaseKit.create(config.workdir / "release") if config.releases else None
        options = release.stack_options(self.kit) if self.kit is not None else {}
        self.stack = Stack(
            StackSpec(
                workdir=config.workdir,
                devices=config.devices,
                broker=config.broker,
                seed=config.seed,
                coordinator_settings={
                    **config.coordinator_settings,
                    **options.get("coordinator_settings", {}),
                },
                sim_flags=options.get("sim_flags", ()),
            )
        )
        self.figures: dict[str, Any] = {}
        self.device_class: dict[str, str] = {}
        self._stage = ""
        self._api: Api | None = None

    @property
    def api(self) -> Api:
        assert self._api is not None, "the coordinator is not started"
        return self._api

    def close(self) -> None:
        if self._api is not None:
            self._api.close()
        self.stack.close()

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict[str, Any]:
        """Every stage in order; the figures. Leaves the stack running (see :meth:`close`)."""
        started = time.time()
        self.figures["demo"] = {
            "started_at": started,
            "devices": self.config.devices,
            "rounds": self.config.rounds,
            "quick": self.config.quick,
            "workdir": str(self.stack.workdir),
        }
        try:
            self._start_stack()
            data = model.splits(self.config.seed)
            v1 = self._train_and_quantize(data)
            self._deploy("deploy", v1["int8"], wave=1)
            self._infer("infer", v1["int8"], wave=1)
            improved, why_not = self._federated(v1)
            if improved is None:
                self.figures["redeploy"] = {"done": False, "reason": why_not}
                for stage in ("requantize", "redeploy", "infer2"):
                    self.r.skip(stage, why_not)
            else:
                self.figures["redeploy"] = {"done": True, "reason": why_not}
                v2 = self._requantize(improved, data)
                self._deploy("redeploy", v2["int8"], wave=2)
                self._infer("infer2", v2["int8"], wave=2)
            self._releases()
        except (DemoError, LeptonError, RuntimeError) as exc:
            # LeptonError: the accuracy gate refused a model, say; RuntimeError: a process
            # of the stack did not start.
            self.r.fail(self._stage, str(exc))
            self.figures["error"] = {"stage": self._stage, "message": str(exc)}
            self._finish(started)
            if isinstance(exc, DemoError):
                raise
            raise DemoError(str(exc)) from exc
        self._finish(started)
        return self.figures

    def _finish(self, started: float) -> None:
        """Wall time, and where the inference tasks went and why (explanations read back)."""
        self.figures["demo"]["finished_at"] = time.time()
        self.figures["demo"]["wall_s"] = time.time() - started
        if "inference" in self.figures:
            tasks = [t for wave in self.figures["inference"] for t in wave.pop("_tasks", [])]
            self.figures["placement"] = self._placement(tasks)

    def _begin(self, stage: str, total: int | None = None, detail: str = "") -> None:
        self._stage = stage
        self.r.begin(stage, total, detail)

    # ------------------------------------------------------------------ stages

    def _start_stack(self) -> None:
        cfg, stack = self.config, self.stack
        self._begin("broker")
        described = stack.start_broker()
        self.figures["demo"]["broker"] = described
        self.r.end("broker", described)
        self._begin("coordinator")
        health = stack.start_coordinator()
        self._api = Api(stack.api_url, token=stack.token, verify=stack.verify)
        self.figures["demo"]["api"] = stack.api_url
        self.r.end("coordinator", f"{stack.api_url} (v{health.get('version')}, SQLite)")
        self._begin("fleet", cfg.devices, "measuring this host's speed for the simulator")
        host = cfg.host_gflops if cfg.host_gflops is not None else model.host_gflops()
        self.figures["demo"]["host_gflops"] = host
        t0 = time.monotonic()
        # One claim for the whole fleet: every device enrols with it at start.
        stack.start_fleet(host_gflops=host, claim=self.api.create_claim(uses=cfg.devices))
        deadline = t0 + cfg.stage_timeout_s
        while True:
            devices = self.api.devices()
            ready = [d for d in devices if d["state"] == "online" and d["capacity"] is not None]
            self.r.update("fleet", len(ready), f"{len(ready)}/{cfg.devices} online and reporting")
            if len(ready) >= cfg.devices:
                break
            if time.monotonic() > deadline:
                raise DemoError(f"only {len(ready)} of {cfg.devices} devices came online")
            self._check()
            time.sleep(0.25)
        seconds = time.monotonic() - t0
        self.device_class = {d["id"]: d["device_class"] or "unknown" for d in ready}
        by_class: dict[str, int] = {}
        for cls in self.device_class.values():
            by_class[cls] = by_class.get(cls, 0) + 1
        self.figures["devices"] = {
            "total": len(ready),
            "by_class": dict(sorted(by_class.items())),
            "registration_s": seconds,
            "devices": [
                {
                    "id": d["id"],
                    "class": d["device_class"],
                    "model": d["device_model"],
                    "fp32_gflops": d["capacity"]["fp32_gflops"],
                    "int8_gops": d["capacity"]["int8_gops"],
                    "slots": d["capacity"]["slots_total"],
                }
                for d in sorted(ready, key=lambda d: d["id"])
            ],
        }
        classes = ", ".join(f"{n} {c}" for c, n in sorted(by_class.items()))
        # Measured now that every device enrolled and connected (see lepton.demo.posture).
        security = self.figures["security"] = posture.measure(stack)
        self.r.end(
            "fleet",
            f"{len(ready)} devices ({security['devices_enrolled']} enrolled) in {seconds:.1f}s:"
            f" {classes}",
        )

    def _check(self) -> None:
        try:
            self.stack.check_alive()
        except RuntimeError as exc:
            raise DemoError(str(exc)) from exc

    def _registry(self) -> Any:
        return model.open_registry(self.stack.database_url, self.stack.data_dir)

    def _train_and_quantize(self, data: Any) -> dict[str, Any]:
        cfg = self.config
        self._begin(
            "train", detail=f"{cfg.central_samples} labelled images, {cfg.central_epochs} epochs"
        )
        central = model.train_central(
            data, samples=cfg.central_samples, epochs=cfg.central_epochs, seed=cfg.seed
        )
        self.figures["central"] = {
            "samples": central.samples,
            "epochs": central.epochs,
            "accuracy": central.accuracy,
            "seconds": central.seconds,
            "test_samples": len(data.test),
        }
        self.r.end(
            "train",
            f"test accuracy {central.accuracy:.1%} "
            f"({central.samples} images, {central.seconds:.1f}s)",
        )
        self._begin("quantize")
        t0 = time.perf_counter()
        registry = self._registry()
        published = model.quantize(registry, central.module, data)
        q = model.quantization_figures(published, time.perf_counter() - t0)
        self.figures["quantization"] = [{"wave": 1, **q}]
        self.r.end("quantize", _gate_text(q))
        weights = model.publish_weights(registry, central.module)
        return {"fp32": published.fp32, "int8": published.int8, "weights": weights}

    def _deploy(self, stage: str, record: Any, *, wave: int) -> None:
        ids = list(self.device_class)
        self._begin(stage, len(ids), f"{record.name} v{record.version} ({record.size:,} bytes)")
        # The coordinator's own deploy (`lepton models deploy`): one pinned task per device.
        deployed = self.api.deploy(
            record.name,
            {
                "version": record.version,
                "device_ids": ids,
                "max_attempts": 3,
                "expires_in_s": 600,
            },
        )
        task_ids = [task["id"] for task in deployed["tasks"]]
        tasks = self.api.wait_tasks(
            DEPLOY,
            task_ids,
            timeout=self.config.stage_timeout_s,
            on_progress=lambda done, _n: self.r.update(stage, done),
            check=self._check,
        )
        figures = deploy_figures(tasks, self.device_class)
        figures.update(wave=wave, model=model.model_ref(record))
        self.figures.setdefault("deploy", []).append(figures)
        if figures["succeeded"] == 0:
            raise DemoError(f"no device deployed the model: {figures['errors'][:3]}")
        self.r.end(stage, f"{figures['succeeded']}/{len(ids)} devices serve v{record.version}")

    def _infer(self, stage: str, record: Any, *, wave: int) -> None:
        cfg = self.config
        n = cfg.devices * cfg.infer_per_device
        samples = 450
        demand = (record.flops or 200_000) * samples / 1e9
        self._begin(stage, n, f"{n} tasks, not pinned")
        precision: Literal["fp32", "int8"] = "int8" if record.precision == "int8" else "fp32"
        params = InferParams(
            model=record.name, source="digits-test", batch_size=1, precision=record.precision
        )
        request = TaskRequest(
            kind=INFER,
            params=encode_params(INFER, params),
            model_class="digits-cnn",
            precision=precision,
            demand_gops=demand,
            runtime="onnxruntime",
            data_source="digits-test",
            max_attempts=3,
            expires_in_s=600,
        )
        task_ids = [self.api.submit(request.body())["id"] for _ in range(n)]
        tasks = self.api.wait_tasks(
            INFER,
            task_ids,
            timeout=cfg.stage_timeout_s * 2,
            on_progress=lambda done, _n: self.r.update(stage, done),
            check=self._check,
        )
        figures = inference_figures(tasks, self.device_class)
        figures.update(wave=wave, model=model.model_ref(record), task_ids=task_ids)
        figures["_tasks"] = tasks
        self.figures.setdefault("inference", []).append(figures)
        acc = figures["accuracy"]
        self.r.end(
            stage,
            f"{figures['succeeded']}/{n} succeeded, accuracy on devices "
            + (f"{acc:.1%}" if acc is not None else "n/a"),
        )

    def _federated(self, v1: dict[str, Any]) -> tuple[Path | None, str]:
        """Run the job from the deployed model's weights; the final FP32 model when it beats
        the deployed one on the test set (else None), and why."""
        cfg = self.config
        self._begin("federated", cfg.rounds)
        outcome = fl.run_job(
            self.api,
            fl.JobRequest(
                rounds=cfg.rounds,
                clients_per_round=cfg.clients,
                epochs=cfg.fl_epochs,
                eval_path=self.stack.fleet_root / "digits-test.npz",
                initial_weights=v1["weights"],
                seed=cfg.seed,
            ),
            timeout=cfg.stage_timeout_s * max(1, cfg.rounds),
            on_round=lambda r, detail: self.r.update("federated", r, detail),
            check=self._check,
            blob_path=lambda digest: self._registry().blob_path(digest),
        )
        train_tasks = outcome.figures.pop("_train_tasks", [])
        outcome.figures["training"] = training_figures(train_tasks, self.device_class)
        self.figures["federated"] = outcome.figures
        if outcome.model_path is None:
            why = str(outcome.figures.get("reason", "not run"))
            self.r.skip("federated", why)
            return None, f"no improved model: federated rounds {why}"
        self.r.end("federated", outcome.summary)
        before = v1["fp32"].accuracy_fp32
        after = outcome.figures.get("final_accuracy")
        if before is not None and (after is None or after <= before):
            return None, (
                f"not redeployed: the federated model's test accuracy "
                f"{'n/a' if after is None else f'{after:.1%}'} does not beat the deployed "
                f"model's {before:.1%}"
            )
        return outcome.model_path, (
            f"federated model {after:.1%} > deployed {before:.1%}"
            if after is not None and before is not None
            else "improved"
        )

    def _releases(self) -> None:
        """A signed agent image rolled out in phases, then a broken one that aborts at its
        canary (:mod:`lepton.demo.release`)."""
        if self.kit is None:
            for key, _ in release.STAGES:
                self.r.skip(key, "not asked for")
            return
        self._stage = release.STAGES[0][0]
        stages = release.ReleaseStages(
            self.stack, self.kit, self.r, timeout_s=self.config.stage_timeout_s, check=self._check
        )
        try:
            stages.run()
        except TimeoutError as exc:
            raise DemoError(str(exc)) from exc
        finally:
            self._stage = stages.stage
            self.figures.update(stages.figures)

    def _requantize(self, fp32_path: Path, data: Any) -> dict[str, Any]:
        self._begin("requantize")
        t0 = time.perf_counter()
        published = model.quantize(self._registry(), fp32_path, data)
        q = model.quantization_figures(published, time.perf_counter() - t0)
        self.figures["quantization"].append({"wave": 2, **q})
        self.r.end("requantize", _gate_text(q))
        return {"fp32": published.fp32, "int8": published.int8}

    def _placement(self, tasks: list[dict[str, Any]]) -> dict[str, Any]:
        explanations: dict[str, dict[str, Any]] = {}
        for t in tasks:
            try:
                explanations[t["id"]] = self.api.explain(t["id"])
            except DemoError as exc:  # the coordinator is gone: say so, keep the rest
                log.warning("explanations unavailable: %s", exc)
                break
        return placement_figures(tasks, self.device_class, explanations)


def _gate_text(q: dict[str, Any]) -> str:
    return (
        f"FP32 {q['accuracy_fp32']:.1%} -> INT8 {q['accuracy_int8']:.1%} "
        f"(drop {q['drop_points']:.2f} pt, gate {q['gate_points']:g} pt), "
        f"{q['size_fp32']:,} -> {q['size_int8']:,} bytes"
    )
