"""The federated-learning benchmark's harness (``bench/bench_fl.py`` runs the phases): its
settings, one job's outcome, and a broker + coordinator + simulated fleets started and
stopped phase by phase; also the centrally trained reference."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._common import private_broker

log = logging.getLogger("bench_fl")

PHASES = ("reference", "accuracy", "compression", "selection", "byzantine")
CANDIDATES: dict[str, dict[str, Any]] = {
    "fedavgm": {"name": "fedavgm", "server_lr": 1.0, "momentum": 0.9},
    "fedadam": {"name": "fedadam", "server_lr": 0.01},
    "fedprox": {"name": "fedprox", "mu": 0.01},
}
ROBUST: dict[str, dict[str, Any]] = {
    "median": {"name": "median"},
    "trimmed_mean": {"name": "trimmed_mean", "beta": 0.2},
    "multikrum": {"name": "multikrum", "num_byzantine": 2},
    "centered_clipping": {"name": "centered_clipping"},
    # The same rules with FedAvgM's server momentum (strategies/momentum.py).
    "median-sm": {"name": "median", "server_momentum": 0.9},
    "trimmed_mean-sm": {"name": "trimmed_mean", "beta": 0.2, "server_momentum": 0.9},
    "multikrum-sm": {"name": "multikrum", "num_byzantine": 2, "server_momentum": 0.9},
    "centered_clipping-sm": {"name": "centered_clipping", "server_momentum": 0.9},
}


# How late a folded update may be in the selection phase's "cost-late" run: a Pi 4 profile
# trains about 8x slower than a gateway and rounds close at the gateways' pace, so its
# update comes some 8-10 rounds late.
LATE_ROUNDS = 12


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    devices: int = 10
    rounds: int = 20
    alpha: float = 0.5
    epochs: int = 2
    batch_size: int = 16
    lr: float = 0.05
    seed: int = 0
    adversaries: int = 2
    select_k: int = 5
    select_rounds: int = 20
    select_epochs: int = 5
    select_late_rounds: int = LATE_ROUNDS
    slow_share: float = 0.4
    phases: tuple[str, ...] = PHASES
    candidates: tuple[str, ...] = tuple(CANDIDATES)
    robust: tuple[str, ...] = tuple(ROBUST)


@dataclass
class Run:
    """One federated job's outcome."""

    label: str
    job: dict[str, Any]
    wall_s: float
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def accuracy(self) -> list[float]:
        return [float(r["accuracy"]) for r in self.history if r.get("accuracy") is not None]

    @property
    def state(self) -> str:
        return str(self.job.get("state"))

    @property
    def error(self) -> str | None:
        return self.job.get("error")

    @property
    def final(self) -> float:
        acc = self.accuracy
        return acc[-1] if acc else float("nan")

    def mean(self, key: str, skip_first: bool = False) -> float:
        rows = self.history[1:] if skip_first and len(self.history) > 1 else self.history
        values = [float(r[key]) for r in rows if r.get(key) is not None]
        return sum(values) / len(values) if values else float("nan")


# ---------------------------------------------------------------------- harness


class Harness:
    """A broker, one coordinator, and fleets started and stopped phase by phase."""

    def __init__(self, root: Path, settings: Settings) -> None:
        self.root = root
        self.s = settings
        self.coordinator: Any = None
        self.api = ""
        self.headers: dict[str, str] = {}
        self._fleets = 0

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Harness]:
        from lepton.coordinator.config import load as load_config
        from lepton.coordinator.service import Coordinator

        with private_broker() as broker:
            self.broker_port = broker.port
            cfg = load_config(
                env={},
                overrides={
                    "instance_id": "bench-fl",
                    "data_dir": str(self.root / "coordinator"),
                    "fl.eval_dir": str(self.root),  # the fleets' evaluation sets
                    "mqtt.port": broker.port,
                    # The private broker has no dynamic security plugin: devices enrol for
                    # their own HTTP tokens; their broker accounts are not made.
                    "mqtt.accounts": "none",
                    "http.port": 0,
                    "database.sqlite_synchronous": "normal",
                    "registry.flush_interval_s": 0.05,
                    "scheduler.batch_interval_s": 0.1,
                    "scheduler.time_budget_s": 0.2,
                    "liveness.max_check_s": 0.5,
                },
            )
            async with Coordinator(cfg) as c:
                await c.link.wait_connected(10)
                self.coordinator = c
                self.api = c.api_url or ""
                self.headers = {"Authorization": f"Bearer {operator_token(c)}"}
                yield self

    @contextlib.asynccontextmanager
    async def fleet(
        self, label: str, mix: dict[str, float], *, adversarial: int = 0
    ) -> AsyncIterator[list[Any]]:
        """Start ``--devices`` virtual devices, each enrolled first with one multi-use claim
        (its own identity, as a real device has); stop them (gracefully) at the end."""
        from lepton.sim.enrol import Enrolment
        from lepton.sim.fleet import FleetSpec, build_devices, enrol_devices, run_fleet

        self._fleets += 1
        spec = FleetSpec(
            devices=self.s.devices,
            state_root=self.root / f"fleet-{label}",
            mix=mix,
            broker_port=self.broker_port,
            data="digits",
            alpha=self.s.alpha,
            seed=self.s.seed,
            capacity_interval=1.0,
            id_prefix=label,
            adversarial=adversarial,
            enrolment=Enrolment(self.api, await self._claim(self.s.devices)),
        )
        await enrol_devices(spec)
        devices = build_devices(spec)
        stop = asyncio.Event()
        task = asyncio.create_task(run_fleet(devices, stop))
        try:
            await self._wait_devices(label, len(devices))
            yield devices
        finally:
            stop.set()
            await task
            await asyncio.sleep(1.0)  # their offline states land before the next fleet

    async def _claim(self, uses: int) -> str:
        """A fresh enrolment claim good for ``uses`` devices (``POST /v1/claims``)."""
        import httpx

        from lepton.protocol import routes

        async with httpx.AsyncClient(base_url=self.api, headers=self.headers) as api:
            r = await api.post(routes.CLAIMS, json={"uses": uses, "expires_in_s": 3600.0})
        if r.status_code != 201:
            raise RuntimeError(f"the coordinator made no claim: {r.status_code} {r.text}")
        token: str = r.json()["claims"][0]["token"]
        return token

    async def _wait_devices(self, prefix: str, n: int) -> None:
        import httpx

        async with httpx.AsyncClient(base_url=self.api, headers=self.headers) as api:
            async with asyncio.timeout(60):
                while True:
                    devices = (await api.get("/v1/devices", params={"state": "online"})).json()
                    ready = [
                        d
                        for d in devices
                        if d["id"].startswith(prefix) and "torch" in (d.get("runtimes") or [])
                    ]
                    if len(ready) >= n:
                        return
                    await asyncio.sleep(0.2)

    def eval_path(self, label: str) -> Path:
        return self.root / f"fleet-{label}" / "digits-test.npz"

    def job(self, label: str, fleet: str, **overrides: Any) -> dict[str, Any]:
        s = self.s
        body: dict[str, Any] = {
            "name": f"bench-{label}",
            "model": "lepton.models.digits:DigitsCNN",
            "data": "digits",
            "rounds": s.rounds,
            "clients_per_round": s.devices,
            "over_select": 0.0,
            "epochs": s.epochs,
            "batch_size": s.batch_size,
            "lr": s.lr,
            "deadline_s": 120.0,
            "eval": str(self.eval_path(fleet)),
            "final_format": "torch",
            "compression": "fp32",
            "seed": s.seed,
            "fairness": {"max_staleness": None},
        }
        body.update(overrides)
        return body

    async def run_job(self, label: str, body: dict[str, Any]) -> Run:
        import httpx

        started = time.perf_counter()
        async with httpx.AsyncClient(base_url=self.api, timeout=30, headers=self.headers) as api:
            r = await api.post("/v1/fl/jobs", json=body)
            r.raise_for_status()
            job_id = r.json()["id"]
            shown = 0
            while True:
                job = (await api.get(f"/v1/fl/jobs/{job_id}")).json()
                closed = [h for h in job.get("history", []) if h["state"] == "closed"]
                for h in closed[shown:]:
                    log.info(
                        "%s round %d: accuracy %.4f, %.1fs, %d bytes up",
                        label,
                        h["round"],
                        h["accuracy"] or 0.0,
                        h["wall_s"] or 0.0,
                        h["bytes_up"] or 0,
                    )
                shown = len(closed)
                if job["state"] in ("done", "failed", "stopped"):
                    break
                await asyncio.sleep(0.5)
        if job["state"] != "done":
            # Reported, not raised: FedAvg under attack, say, diverges until no device can
            # train on its weights any more, and that is a result.
            log.warning("%s: job ended %s: %s", label, job["state"], job.get("error"))
        history = [h for h in job["history"] if h["state"] == "closed"]
        return Run(label, job, time.perf_counter() - started, history)


# ---------------------------------------------------------------------- phases


def central_reference(s: Settings, eval_path: Path | None = None) -> dict[str, Any]:
    """DigitsCNN trained centrally on all the devices' data (the training split), with the
    devices' optimiser settings, for rounds x epochs epochs; test accuracy per epoch."""
    import torch
    from torch.nn import functional

    from lepton.models.data import digits_splits
    from lepton.models.digits import DigitsCNN

    splits = digits_splits(seed=s.seed)
    x, y = torch.from_numpy(splits.train.x), torch.from_numpy(splits.train.y)
    xt, yt = torch.from_numpy(splits.test.x), torch.from_numpy(splits.test.y)
    torch.manual_seed(s.seed)
    model = DigitsCNN()
    opt = torch.optim.SGD(model.parameters(), lr=s.lr)
    gen = torch.Generator().manual_seed(s.seed)
    curve = []
    started = time.perf_counter()
    for _ in range(s.rounds * s.epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), s.batch_size):
            idx = order[i : i + s.batch_size]
            opt.zero_grad()
            functional.cross_entropy(model(x[idx]), y[idx]).backward()  # type: ignore[no-untyped-call]
            opt.step()
        model.eval()
        with torch.no_grad():
            curve.append(float((model(xt).argmax(1) == yt).float().mean()))
    return {"accuracy": curve, "final": curve[-1], "train_s": time.perf_counter() - started}


FAST = {"x86-gateway": 0.5, "jetson-orin-nano": 0.5}


def operator_token(c: Any) -> str:
    """An operator token (scope admin) made on the in-process coordinator's database, as
    ``lepton tokens create`` makes one."""
    from lepton.coordinator.auth import credentials
    from lepton.coordinator.auth.store import AuthStore

    token = credentials.new("operator")
    AuthStore(c.store.engine).create_token(
        "bench-fl", credentials.digest(token), ["admin"], created_by="bench"
    )
    return token
