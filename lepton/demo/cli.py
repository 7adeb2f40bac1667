"""``lepton-demo``: broker, coordinator and a simulated fleet on this machine, and the whole
loop on them (train, INT8 through the gate, deploy, inference placed by the cost model,
federated rounds, redeploy), with live progress and an HTML + JSON report.

Ctrl-C (or SIGTERM) stops every process it started; none outlives it.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from lepton.coordinator.cli.exitcodes import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE

MARKER = ".lepton-demo"


def build_parser() -> argparse.ArgumentParser:
    """The ``lepton-demo`` argument parser."""
    demo = argparse.ArgumentParser(
        prog="lepton-demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument(
        "--devices", type=int, default=None, help="virtual devices (default 20; 8 with --quick)"
    )
    demo.add_argument(
        "--rounds", type=int, default=None, help="federated rounds (default 3; 2 with --quick)"
    )
    demo.add_argument("--quick", action="store_true", help="a smaller, faster run")
    demo.add_argument(
        "--workdir",
        type=Path,
        default=Path("lepton-demo"),
        help="where state, logs and the report go (default ./lepton-demo; replaced on each run)",
    )
    demo.add_argument(
        "--keep",
        action="store_true",
        help="keep broker, coordinator and fleet running after the report, until Ctrl-C",
    )
    demo.add_argument(
        "--broker",
        choices=("auto", "mosquitto", "embedded"),
        default="auto",
        help="auto: mosquitto if installed, else the embedded Python broker",
    )
    demo.add_argument("--seed", type=int, default=0)
    return demo


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lepton-demo``; returns the exit code."""
    return cmd_demo(build_parser().parse_args(argv))


def _prepare_workdir(path: Path) -> Path:
    """An empty work directory; a previous demo's is replaced, anything else is refused."""
    path = path.expanduser().resolve()
    if path.exists():
        if not (path / MARKER).exists() and any(path.iterdir()):
            raise SystemExit(
                f"error: {path} exists and is not a demo work directory; choose --workdir"
            )
        shutil.rmtree(path)
    path.mkdir(parents=True)
    (path / MARKER).write_text("lepton-demo work directory: replaced on the next run\n")
    return path


def _raise_interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _config(args: argparse.Namespace) -> Any:
    from lepton.demo.loop import DemoConfig

    devices = args.devices if args.devices is not None else (8 if args.quick else 20)
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 3)
    if devices < 2 or rounds < 1:
        return None
    return DemoConfig(
        workdir=_prepare_workdir(args.workdir),
        devices=devices,
        rounds=rounds,
        quick=args.quick,
        broker=args.broker,
        seed=args.seed,
        infer_per_device=1 if args.quick else 2,
    )


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo; returns the exit code. SIGTERM is handled like Ctrl-C."""
    from rich.console import Console

    from lepton.demo.loop import STAGES, Demo
    from lepton.demo.progress import LiveReporter

    config = _config(args)
    if config is None:
        sys.stderr.write("error: --devices must be >= 2 and --rounds >= 1\n")
        return EXIT_USAGE
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=120)
    reporter = LiveReporter(STAGES, console)
    demo = Demo(config, reporter)
    console.print(
        f"[bold]Lepton demo[/]: {config.devices} devices, {config.rounds} federated rounds, "
        f"work directory {config.workdir}"
    )
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return _run(demo, reporter, console, keep=args.keep)
    except KeyboardInterrupt:
        console.print("\nStopping fleet, coordinator and broker...")
        return EXIT_INTERRUPTED
    finally:
        # Shutdown must finish: a second Ctrl-C must not leave processes behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            demo.close()
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, previous)


def _run(demo: Any, reporter: Any, console: Any, *, keep: bool) -> int:
    from lepton.demo.api import DemoError
    from lepton.demo.html import write_html
    from lepton.demo.report import print_summary, write_json

    code = EXIT_OK
    workdir = demo.config.workdir
    try:
        with reporter:
            figures = demo.run()
    except DemoError as exc:
        code = EXIT_ERROR
        figures = demo.figures
        console.print(f"[red]The demo stopped:[/] {exc}\nLogs: {workdir / 'logs'}")
    json_path = write_json(figures, workdir / "report" / "figures.json")
    html_path = write_html(figures, workdir / "report" / "report.html")
    print_summary(console, figures, [html_path, json_path])
    if not keep or code != EXIT_OK:
        return code
    console.print(
        f"Still running (--keep): coordinator API {demo.stack.api_url}, e.g. "
        f"`LEPTON_TOKEN=$(cat {demo.stack.token_file}) lepton --api {demo.stack.api_url}"
        f" --ca-file {demo.stack.ca_file} devices ls`; Ctrl-C stops everything."
    )
    while True:
        try:
            demo.stack.check_alive()
        except RuntimeError as exc:
            console.print(f"[red]{exc}[/]")
            return EXIT_ERROR
        time.sleep(1.0)
