"""Federated learning benchmark: real agents, a real Mosquitto, the coordinator's round engine.

    .venv/bin/python -m bench.bench_fl                 # full run (20-30 minutes on 2 cores)
    .venv/bin/python -m bench.bench_fl --tiny          # about a minute; what the tests run
    .venv/bin/python -m bench.bench_fl --only accuracy,byzantine --json out.json

One coordinator (in this process) and simulated fleets of ``--devices`` virtual devices
(``lepton.sim``: each a real agent with its own MQTT session, outbox and HTTP transfers,
training torch models on the host, its compute time stretched to its profile's speed).
sklearn's digits are split across the devices with Dirichlet label skew (``--alpha 0.5``);
the model is ``lepton.models.digits:DigitsCNN`` (7k parameters); every round is scored centrally on
the held-out test split (450 images). Phases, all in one run:

(a) **reference**: the same model trained centrally on the union of the devices' data, for
    as many epochs as a federated job's devices train in total (rounds x local epochs);
(b) **accuracy**: FedAvg, then candidate strategies (FedAvgM, FedAdam, FedProx) with the same
    local training, every device in every round; accuracy per round, the best strategy kept;
(c) **compression**: FedAvg with INT8 updates against the FP32 run of (b): bytes uploaded
    per round and final accuracy;
(d) **selection**: a fleet where some devices are several times slower (Raspberry Pi 4
    profiles next to x86 gateways), ``k`` of ``n`` devices per round with over-selection and
    five local epochs (so that compute, which the profiles stretch, outweighs the fixed
    per-round costs): mean round wall time with cost-model selection against uniform random
    selection; also the cost model waiting for the devices its fairness floor forces in,
    and the cost model folding late updates into later rounds (``[late] policy = "fold"``);
(e) **Byzantine**: ``--adversaries`` of the devices send sign-flipped updates scaled 10x;
    FedAvg and robust strategies (median, trimmed mean, Multi-Krum, each also with server
    momentum: ``server_momentum = 0.9``), each against its own
    clean run and the clean FedAvg run.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import table
from bench._fl_harness import (
    CANDIDATES,
    FAST,
    LATE_ROUNDS,
    PHASES,
    ROBUST,
    Harness,
    Run,
    Settings,
    central_reference,
)

log = logging.getLogger("bench_fl")


async def accuracy_phase(h: Harness, out: dict[str, Any]) -> None:
    s = h.s
    async with h.fleet("acc", FAST):
        runs = {"fedavg": await h.run_job("fedavg", h.job("fedavg", "acc"))}
        for name in s.candidates:
            body = h.job(name, "acc", strategy=CANDIDATES[name])
            runs[name] = await h.run_job(name, body)
        if "compression" in s.phases:
            runs["fedavg-int8"] = await h.run_job(
                "fedavg-int8", h.job("fedavg-int8", "acc", compression="int8")
            )
        if "byzantine" in s.phases:
            for name in s.robust:
                label = f"{name}-clean"
                runs[label] = await h.run_job(label, h.job(label, "acc", strategy=ROBUST[name]))
    out["runs"].update({k: _summary(v) for k, v in runs.items()})
    best = max((n for n in s.candidates), key=lambda n: runs[n].final, default=None)
    out["accuracy"] = {
        "fedavg": runs["fedavg"].accuracy,
        "best": best,
        "best_accuracy": runs[best].accuracy if best else None,
        "finals": {n: runs[n].final for n in ("fedavg", *s.candidates)},
    }
    if "fedavg-int8" in runs:
        fp32, int8 = runs["fedavg"], runs["fedavg-int8"]
        out["compression"] = {
            "bytes_up_fp32": fp32.mean("bytes_up"),
            "bytes_up_int8": int8.mean("bytes_up"),
            "ratio": int8.mean("bytes_up") / fp32.mean("bytes_up"),
            "final_fp32": fp32.final,
            "final_int8": int8.final,
            "accuracy_cost_points": 100 * (fp32.final - int8.final),
        }
    out["_runs"] = runs


async def selection_phase(h: Harness, out: dict[str, Any]) -> None:
    s = h.s
    slow = max(1, round(s.devices * s.slow_share))
    mix = {"x86-gateway": float(s.devices - slow), "rpi4": float(slow)}
    runs: dict[str, Run] = {}
    # "cost-fair": the cost model with fairness.wait_for_forced, so the devices the
    # staleness floor forces into a round are waited for and their updates count.
    # "cost-late": the cost model with late updates folded into later rounds (discounted),
    # so slow devices count without any round waiting for them.
    for method in ("cost", "random", "cost-fair", "cost-late"):
        # A fresh fleet for each: devices start cool and charged, so no run inherits
        # another's heat (a Pi 4 under load throttles, and throttled devices are not
        # eligible).
        label = "sel" + "".join(part[0] for part in method.split("-"))
        fairness: dict[str, Any] = {"max_staleness": 4, "max_forced_share": 0.25}
        if method == "cost-fair":
            fairness["wait_for_forced"] = True
        late = {"policy": "fold", "max_rounds": s.select_late_rounds}
        async with h.fleet(label, mix):
            body = h.job(
                f"select-{method}",
                label,
                rounds=s.select_rounds,
                epochs=s.select_epochs,
                clients_per_round=s.select_k,
                min_results=s.select_k,
                over_select=0.4,
                selection=method.split("-")[0],
                fairness=fairness,
                **({"late": late} if method == "cost-late" else {}),
            )
            runs[method] = await h.run_job(f"select-{method}", body)
    cost, rand = runs["cost"], runs["random"]
    picks: dict[str, dict[str, int]] = {}
    # method -> fast|slow -> rounds late (mean, max) of the updates folded in
    late_by: dict[str, dict[str, dict[str, float]]] = {}
    for method, run in runs.items():
        counts: dict[str, int] = {"rounds_waiting_on_slow": 0, "slow_asked": 0}
        staleness: dict[str, list[int]] = {"fast": [], "slow": []}
        for r in run.history:
            counts["slow_asked"] += sum("rpi4" in d for d in r.get("devices") or [])
            refused = (r.get("rejects") or {}).get("late", 0)
            if refused:
                counts["refused_late"] = counts.get("refused_late", 0) + refused
            slow_in = False
            for d in r.get("contributors") or []:
                kind = "slow" if "rpi4" in d else "fast"
                counts[kind] = counts.get(kind, 0) + 1
                if "@" in d:  # a late update, folded in: this round did not wait for it
                    counts[f"{kind}_late"] = counts.get(f"{kind}_late", 0) + 1
                    staleness[kind].append(int(r["round"]) - int(d.rsplit("@", 1)[1]))
                    continue
                slow_in = slow_in or kind == "slow"
            counts["rounds_waiting_on_slow"] += slow_in
        for kind, late in staleness.items():
            if late:
                late_by.setdefault(method, {})[kind] = {
                    "mean": round(sum(late) / len(late), 2),
                    "max": max(late),
                }
        picks[method] = counts
    out["selection"] = {
        "fleet": mix,
        "k": s.select_k,
        "asked": int(s.select_k * 1.4 + 0.999),
        "rounds": s.select_rounds,
        "round_s_cost": cost.mean("wall_s"),
        "round_s_random": rand.mean("wall_s"),
        "ratio": cost.mean("wall_s") / rand.mean("wall_s"),
        "round_s_cost_after_first": cost.mean("wall_s", skip_first=True),
        "round_s_random_after_first": rand.mean("wall_s", skip_first=True),
        "final_cost": cost.final,
        "final_random": rand.final,
        "round_s_cost_fair": runs["cost-fair"].mean("wall_s"),
        "ratio_cost_fair": runs["cost-fair"].mean("wall_s") / rand.mean("wall_s"),
        "final_cost_fair": runs["cost-fair"].final,
        "round_s_cost_late": runs["cost-late"].mean("wall_s"),
        "ratio_cost_late": runs["cost-late"].mean("wall_s") / rand.mean("wall_s"),
        "final_cost_late": runs["cost-late"].final,
        "updates_counted": picks,
        "late_staleness": late_by,
    }
    out["runs"].update({f"select-{k}": _summary(v) for k, v in runs.items()})


async def byzantine_phase(h: Harness, out: dict[str, Any], clean: dict[str, Run]) -> None:
    s = h.s
    runs: dict[str, Run] = {}
    async with h.fleet("byz", FAST, adversarial=s.adversaries) as devices:
        bad = sorted(d.config.device.id for d in devices if d.update_transform is not None)
        runs["fedavg"] = await h.run_job("byz-fedavg", h.job("byz-fedavg", "byz"))
        for name in s.robust:
            body = h.job(f"byz-{name}", "byz", strategy=ROBUST[name])
            runs[name] = await h.run_job(f"byz-{name}", body)
    ref = clean.get("fedavg")
    rows = {}
    for name, run in runs.items():
        own = clean.get(f"{name}-clean") if name != "fedavg" else ref
        rows[name] = {
            "state": run.state,
            "error": run.error,
            "rounds_closed": len(run.history),
            "final": run.final,
            "clean_own": own.final if own else None,
            "clean_fedavg": ref.final if ref else None,
            "drop_vs_fedavg_points": 100 * (ref.final - run.final) if ref else None,
            "drop_vs_own_points": 100 * (own.final - run.final) if own else None,
            "accuracy": run.accuracy,
        }
    out["byzantine"] = {"adversaries": bad, "attack": "sign_flip x10", "strategies": rows}
    out["runs"].update({f"byz-{k}": _summary(v) for k, v in runs.items()})


def _summary(run: Run) -> dict[str, Any]:
    return {
        "job": run.job["id"],
        "state": run.state,
        "error": run.error,
        "final": run.final,
        "accuracy": run.accuracy,
        "round_s": run.mean("wall_s"),
        "bytes_up": run.mean("bytes_up"),
        "wall_s": run.wall_s,
    }


# ---------------------------------------------------------------------- report


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _points(v: float | None) -> str:
    """Accuracy points lost (a drop), or '-'."""
    return "-" if v is None else f"{-v:+.1f}"


def report(out: dict[str, Any], s: Settings) -> str:
    lines = [
        f"bench_fl: {s.devices} devices, alpha {s.alpha}, {s.rounds} rounds, "
        f"{s.epochs} local epoch(s), batch {s.batch_size}, SGD lr {s.lr}"
    ]
    ref = out.get("reference")
    if ref:
        lines.append(
            f"central reference ({len(ref['accuracy'])} epochs on all the data): "
            f"{_pct(ref['final'])} %"
        )
    acc = out.get("accuracy")
    if acc:
        names = ["fedavg", *(n for n in acc["finals"] if n != "fedavg")]
        runs = out["_runs"]
        rows = [("round", *names)]
        for i in range(s.rounds):
            row = [str(i + 1)]
            for n in names:
                a = runs[n].accuracy
                row.append(_pct(a[i]) if i < len(a) else "-")
            rows.append(tuple(row))
        lines += ["", "accuracy (%) per round", table(rows)]
        if acc["best"] is not None:
            lines.append(f"best strategy: {acc['best']} ({_pct(acc['finals'][acc['best']])} %)")
    comp = out.get("compression")
    if comp:
        lines += [
            "",
            f"bytes up per round: fp32 {comp['bytes_up_fp32']:.0f}, int8 "
            f"{comp['bytes_up_int8']:.0f} ({comp['ratio']:.3f}x); final accuracy fp32 "
            f"{_pct(comp['final_fp32'])} %, int8 {_pct(comp['final_int8'])} % "
            f"({comp['accuracy_cost_points']:+.1f} points lost)",
        ]
    sel = out.get("selection")
    if sel:
        lines += [
            "",
            f"round wall time, {sel['k']} of {s.devices} devices per round "
            f"({sel['asked']} asked), fleet {sel['fleet']}: cost model "
            f"{sel['round_s_cost']:.2f} s, random {sel['round_s_random']:.2f} s "
            f"({sel['ratio']:.2f}x); final accuracy {_pct(sel['final_cost'])} % vs "
            f"{_pct(sel['final_random'])} %; cost model waiting for forced devices "
            f"{sel['round_s_cost_fair']:.2f} s ({sel['ratio_cost_fair']:.2f}x, final "
            f"{_pct(sel['final_cost_fair'])} %); cost model folding late updates "
            f"{sel['round_s_cost_late']:.2f} s ({sel['ratio_cost_late']:.2f}x, final "
            f"{_pct(sel['final_cost_late'])} %); updates counted {sel['updates_counted']}; "
            f"rounds late of the folded updates {sel['late_staleness']}",
        ]
    byz = out.get("byzantine")
    if byz:
        rows = [("strategy", "attacked %", "own clean %", "vs own", "clean FedAvg %", "vs FedAvg")]
        notes = []
        for name, r in byz["strategies"].items():
            if r["state"] != "done":
                notes.append(
                    f"{name}: {r['state']} after {r['rounds_closed']} rounds: {r['error']}"
                )
            rows.append(
                (
                    name,
                    _pct(r["final"]),
                    _pct(r["clean_own"]),
                    _points(r["drop_vs_own_points"]),
                    _pct(r["clean_fedavg"]),
                    _points(r["drop_vs_fedavg_points"]),
                )
            )
        rows_text = table(rows) + "".join(f"\n{n}" for n in notes)
        lines += ["", f"Byzantine: {byz['adversaries']} send {byz['attack']}", rows_text]
    return "\n".join(lines)


# ---------------------------------------------------------------------- entry point


def parse(argv: Sequence[str] | None) -> tuple[Settings, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="4 devices, 2 rounds: a smoke run")
    p.add_argument("--devices", type=int, default=10)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--adversaries", type=int, default=2)
    p.add_argument(
        "--late-rounds",
        type=int,
        default=LATE_ROUNDS,
        help="late.max_rounds of the selection phase's cost-late run",
    )
    p.add_argument("--only", default=",".join(PHASES), help="comma-separated phases")
    p.add_argument(
        "--candidates",
        default=",".join(CANDIDATES),
        help=f"strategies tried against FedAvg (of {', '.join(CANDIDATES)}; '' for none)",
    )
    p.add_argument(
        "--robust",
        default=",".join(ROBUST),
        help=f"strategies under attack (of {', '.join(ROBUST)})",
    )
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--log-level", default="INFO")
    ns = p.parse_args(argv)
    phases = tuple(x for x in ns.only.split(",") if x)
    unknown = set(phases) - set(PHASES)
    if unknown:
        p.error(f"unknown phases {sorted(unknown)} (known: {', '.join(PHASES)})")
    candidates = tuple(x for x in ns.candidates.split(",") if x)
    robust = tuple(x for x in ns.robust.split(",") if x)
    for given, known in ((candidates, CANDIDATES), (robust, ROBUST)):
        if set(given) - set(known):
            p.error(f"unknown strategies {sorted(set(given) - set(known))}")
    if ns.tiny:
        s = Settings(
            devices=5,
            rounds=2,
            alpha=ns.alpha,
            epochs=1,
            seed=ns.seed,
            adversaries=1,
            select_k=2,
            select_rounds=2,
            select_epochs=1,
            phases=phases,
            candidates=("fedavgm",),
            robust=("median",),
        )
    else:
        s = Settings(
            devices=ns.devices,
            rounds=ns.rounds,
            alpha=ns.alpha,
            epochs=ns.epochs,
            lr=ns.lr,
            seed=ns.seed,
            adversaries=ns.adversaries,
            select_late_rounds=ns.late_rounds,
            phases=phases,
            candidates=candidates,
            robust=robust,
        )
    return s, ns


async def run(s: Settings) -> dict[str, Any]:
    out: dict[str, Any] = {"settings": dataclasses.asdict(s), "runs": {}}
    if "reference" in s.phases:
        out["reference"] = await asyncio.to_thread(central_reference, s)
    with tempfile.TemporaryDirectory(prefix="lepton-bench-fl-") as tmp:
        h = Harness(Path(tmp), s)
        async with h.running():
            if {"accuracy", "compression"} & set(s.phases) or "byzantine" in s.phases:
                await accuracy_phase(h, out)
            if "selection" in s.phases:
                await selection_phase(h, out)
            if "byzantine" in s.phases:
                await byzantine_phase(h, out, out.get("_runs", {}))
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    s, ns = parse(argv)
    logging.basicConfig(
        level=getattr(logging, ns.log_level.upper(), logging.INFO),
        format="%(asctime)s %(name)s: %(message)s",
    )
    for noisy in ("agent", "coordinator", "httpx", "uvicorn"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    started = time.perf_counter()
    out = asyncio.run(run(s))
    out["wall_s"] = time.perf_counter() - started
    out["date"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = report(out, s)
    print(text)
    print(f"(total {out['wall_s']:.0f} s)")
    out.pop("_runs", None)
    if ns.json:
        ns.json.write_text(json.dumps(out, indent=2, default=str))
    return out


if __name__ == "__main__":
    main()
