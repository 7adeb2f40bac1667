"""Staged rollouts of signed agent images to 1,000 virtual devices (real agents).

    python -m bench.bench_rollout [--devices 1000] [--processes 4] [--fail-share 0.2]
                                  [--trial-s 1] [--timeout 900] [--write-docs]

Everything runs as in production, each in its own process: mosquitto, the coordinator
(``lepton coordinator run``, SQLite) and the fleet (``lepton-sim``). Every device pins the
same release trust root; it fetches each signed manifest and its files from the coordinator
and verifies them for real (signatures, class, version, floor, every file's hash), then
simulates the install (:mod:`lepton.sim.updater`: two slots, a restart into the new one, a
health trial, a commit or a roll-back), reporting each step in its birth message as a real
device does. Versions go 1.0.0 (what devices start on) -> 1.1.0 -> 1.2.0 -> 1.3.0.

1. A phased rollout of a good release, 1.1.0: canary of 25 devices, then 10 %, 50 %, 100 %,
   each phase starting once the one before it succeeded. Baseline, in the same run: a
   one-shot rollout (a single 100 % phase) of another good release, 1.2.0. Time from the
   rollout's creation until every device committed the new version.
2. A bad release, 1.3.0, whose health trial fails on ``--fail-share`` of the devices (the
   same ones every run: a hash of device id and version), rolled out with the same phases and
   abort criteria (failure share above 10 % once 5 devices finished; revert on abort). It must
   stop within its canary, touch no device outside the canary, and leave every device back
   on 1.2.0 (those that failed roll back by themselves; those that committed it are sent a
   ``revert``). The benchmark exits non-zero when any of that does not hold.

``--devices 20 --processes 1`` is what the test suite runs.
``--write-docs`` replaces the ``## Staged rollouts`` section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench import _common
from lepton.demo.release_kit import (
    ReleaseKit,
    RolloutClient,
    fleet_versions,
)
from lepton.demo.stack import Stack, StackSpec
from lepton.sim.updater import UpdateFail

SECTION = "## Staged rollouts"
START_VERSION = "1.0.0"
PHASED, ONE_SHOT, BAD = "1.1.0", "1.2.0", "1.3.0"
# 25 of 1,000: with a fifth of the devices failing, a canary this size holds none of them with
# probability 0.8**25 = 0.4 % (a canary of 10: 11 %, and the rollout then stops at 10 %).
CANARY = 25
PHASES: tuple[dict[str, Any], ...] = (
    {"count": CANARY},
    {"percent": 10.0},
    {"percent": 50.0},
    {"percent": 100.0},
)


def wait_until(check: Any, timeout: float, what: str, interval: float = 0.25) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return time.time()
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")


class PhaseClock:
    """When each phase of a rollout began, from its status polls."""

    def __init__(self) -> None:
        self.t0 = time.time()
        self.began: dict[int, float] = {0: self.t0}

    def __call__(self, status: dict[str, Any]) -> None:
        self.began.setdefault(int(status.get("phase") or 0), time.time())

    def durations(self, end: float) -> dict[int, float]:
        """Seconds per phase seen under way (a phase its predecessor covered passes unseen)."""
        phases = sorted(self.began)
        ends = [self.began[k] for k in phases[1:]] + [end]
        return {k: e - self.began[k] for k, e in zip(phases, ends, strict=True)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    figures: dict[str, Any] = {"devices": args.devices, "processes": args.processes}
    fail = UpdateFail(share=args.fail_share, versions=frozenset({BAD}))
    with contextlib.ExitStack() as keep:
        if args.workdir is not None:
            work = args.workdir.resolve()
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(keep.enter_context(tempfile.TemporaryDirectory(prefix="lepton-rollout-")))
        kit = ReleaseKit.create(work / "release")
        spec = StackSpec(
            workdir=work / "stack",
            devices=args.devices,
            data=None,
            fleet_processes=args.processes,
            capacity_interval_s=5.0,
            host_gflops=50.0,
            coordinator_settings={"releases.root_file": str(kit.root_file)},
            sim_flags=(
                *("--release-root", str(kit.root_file)),
                *("--agent-version", START_VERSION),
                *("--update-fail", f"{args.fail_share}:{BAD}"),
                *("--trial-s", str(args.trial_s)),
            ),
        )
        with Stack(spec) as stack, contextlib.ExitStack() as scope:
            stack.start_broker()
            stack.start_coordinator()
            api = scope.enter_context(
                httpx.Client(
                    base_url=stack.api_url, timeout=60, headers=stack.headers, verify=stack.verify
                )
            )
            client = RolloutClient(api)
            out = work / "bundles"
            for version in (PHASED, ONE_SHOT, BAD):
                client.publish(kit.build(version, out=out))
            stack.start_fleet()
            wait_until(
                lambda: (
                    stack.check_alive(),
                    fleet_versions(api).get(START_VERSION, 0) >= args.devices,
                )[1],
                args.timeout,
                f"every device online on {START_VERSION}",
            )
            ids = [d["id"] for d in api.get("/v1/devices", params={"limit": 10_000}).json()]
            figures["failing_devices"] = sum(fail.fails(i, BAD) for i in ids)

            # 1. phased, then one-shot (the baseline)
            for key, version, phases in (
                ("phased", PHASED, PHASES),
                ("oneshot", ONE_SHOT, ({"percent": 100.0},)),
            ):
                clock = PhaseClock()
                rid = client.create(kit.name, version, phases=phases, max_in_flight=args.devices)
                status = client.wait(rid, args.timeout, check=stack.check_alive, on_status=clock)
                t1 = time.time()
                figures[f"{key}_state"] = status["state"]
                figures[f"{key}_s"] = t1 - clock.t0
                figures[f"{key}_succeeded"] = client.count(status, "succeeded")
                figures[f"{key}_phase_s"] = clock.durations(t1)
                print(f"{key}: {status['state']} {status.get('counts')}", file=sys.stderr)
                wait_until(
                    lambda v=version: fleet_versions(api).get(v, 0) >= args.devices,
                    args.timeout,
                    f"every device reporting {version}",
                )

            # 2. the bad release
            clock = PhaseClock()
            rid = client.create(
                kit.name,
                BAD,
                phases=PHASES,
                max_in_flight=args.devices,
                abort_failure_share=0.1,
                abort_min_finished=5,
                revert_on_abort=True,
            )
            status = client.wait(rid, args.timeout, check=stack.check_alive, on_status=clock)
            t_stop = time.time()
            canary = client.status(rid, limit=CANARY)
            figures["bad_canary_failing"] = sum(
                fail.fails(d["device_id"], BAD) for d in canary.get("devices", [])[:CANARY]
            )
            figures["bad_state"] = status["state"]
            figures["bad_phase"] = status.get("phase")
            figures["bad_reason"] = status.get("reason", "")
            figures["bad_stop_s"] = t_stop - clock.t0
            figures["bad_touched"] = client.touched(status)

            def settled() -> bool:
                s = client.status(rid, limit=1)
                busy = client.count(s, "dispatched", "staged", "reverting")
                return not busy and fleet_versions(api).get(ONE_SHOT, 0) >= args.devices

            t_back = wait_until(settled, args.timeout, f"every device back on {ONE_SHOT}")
            final = client.status(rid, limit=1)
            figures["bad_reverted"] = client.count(final, "reverted")
            figures["bad_rolled_back"] = client.count(final, "rolled_back")
            figures["bad_final_counts"] = final.get("counts", {})
            figures["bad_back_s"] = t_back - clock.t0
            figures["final_versions"] = fleet_versions(api)
    return figures


def verdict(f: dict[str, Any]) -> list[str]:
    """What does not hold (empty: everything does)."""
    bad: list[str] = []
    n = f["devices"]
    for key in ("phased", "oneshot"):
        if f[f"{key}_state"] != "completed" or f[f"{key}_succeeded"] != n:
            bad.append(f"{key} rollout: {f[f'{key}_state']}, {f[f'{key}_succeeded']}/{n} committed")
    if f["bad_state"] not in ("aborted", "failed"):
        bad.append(f"bad release: rollout ended {f['bad_state']}, not aborted")
    if f["bad_phase"] not in (0, None):
        bad.append(
            f"bad release: stopped in phase {f['bad_phase']}, not the canary (which held"
            f" {f['bad_canary_failing']} failing devices)"
        )
    if f["bad_touched"] > min(CANARY, n):
        bad.append(f"bad release reached {f['bad_touched']} devices, more than the canary")
    if f["final_versions"] != {ONE_SHOT: n}:
        bad.append(f"devices after the abort: {f['final_versions']}, not all on {ONE_SHOT}")
    return bad


# ---------------------------------------------------------------- output


def _s(v: float) -> str:
    return "n/a" if not math.isfinite(v) else f"{v:.1f} s"


def rows(f: dict[str, Any]) -> list[tuple[str, str, str]]:
    ratio = f["phased_s"] / f["oneshot_s"] if f["oneshot_s"] else math.nan
    phases = ", ".join(f"{k}: {_s(t)}" for k, t in sorted(f["phased_phase_s"].items()))
    return [
        ("figure", "value", "baseline"),
        (
            f"good release to {f['devices']:,} devices, phased (canary {CANARY}, 10 %, 50 %, 100 %)"
            " -> all committed",
            _s(f["phased_s"]),
            "",
        ),
        ("  per phase (0: the canary)", phases, ""),
        ("good release, one-shot (one 100 % phase) -> all committed", "", _s(f["oneshot_s"])),
        ("  ratio phased / one-shot", f"{ratio:.2f}x", "1.00x"),
        (
            f"bad release (trial fails on {f['failing_devices']} of {f['devices']:,} devices):"
            " rollout",
            f"{f['bad_state']} in phase {f['bad_phase']}",
            "",
        ),
        ("  creation -> stopped", _s(f["bad_stop_s"]), ""),
        (
            "  devices that took it (rolled back by themselves / committed, then reverted)",
            f"{f['bad_touched']} ({f['bad_rolled_back']} / {f['bad_reverted']})",
            f"canary {CANARY}",
        ),
        (f"  creation -> every device back on {ONE_SHOT}", _s(f["bad_back_s"]), ""),
    ]


def markdown(f: dict[str, Any], command: str) -> str:
    lines = [
        SECTION,
        "",
        _common.run_line(command),
        "",
        f"{f['devices']:,} virtual devices (each a real agent pinning the release trust root; "
        f"{f['processes']} simulator processes), one mosquitto, one coordinator on SQLite, all "
        "on this machine. Each device fetches the signed manifest and files from the "
        "coordinator and verifies them for real; the install itself is simulated (two slots, "
        "a restart of the agent into the new one, a health trial of "
        f"{f.get('trial_s', 1.0):g} s, commit or roll back), reported in its birth message. "
        "Baseline: the same fleet taking another good release in one 100 % phase.",
        "",
        "| figure | value | baseline |",
        "|---|---|---|",
    ]
    for name, a, b in rows(f)[1:]:
        lines.append(f"| {name.strip()} | {a} | {b} |")
    failed = verdict(f)
    lines += [
        "",
        "Checked by the benchmark (it exits non-zero otherwise): both good rollouts complete "
        "on every device; the bad one stops within its canary, reaches no device outside it, "
        f"and every device ends on {ONE_SHOT}: "
        + ("held." if not failed else "**did not hold**: " + "; ".join(failed) + "."),
        f"The bad release's canary held {f['bad_canary_failing']} of its failing devices; "
        f"the abort: {f['bad_reason'] or 'n/a'}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=4, help="simulator processes")
    parser.add_argument("--fail-share", type=float, default=0.2)
    parser.add_argument("--trial-s", type=float, default=1.0, help="a health trial's length")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument(
        "--workdir", type=Path, default=None, help="keep state and logs here (default: a temp dir)"
    )
    parser.add_argument("--write-docs", action="store_true", help="update docs/BENCHMARKS.md")
    args = parser.parse_args(argv)
    figures = run(args)
    figures["trial_s"] = args.trial_s
    print(_common.table(rows(figures)))
    print(json.dumps(figures, indent=2, sort_keys=True, default=str))
    failed = verdict(figures)
    if args.write_docs:
        shown = list(argv if argv is not None else sys.argv[1:])
        if "--workdir" in shown:  # where it kept its files is no part of the figure
            i = shown.index("--workdir")
            del shown[i : i + 2]
        command = _common.command_line("bench.bench_rollout", shown)
        _common.write_section(
            SECTION, markdown(figures, command), _common.REPO / "docs" / "BENCHMARKS.md"
        )
    figures["verdict"] = failed
    for line in failed:
        print(f"FAILED: {line}", file=sys.stderr)
    return figures


if __name__ == "__main__":
    sys.exit(1 if main()["verdict"] else 0)
