"""Shared helpers for the benchmarks: a private mosquitto and a results table."""

from __future__ import annotations

import datetime
import os
import platform
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.support.broker import Broker  # noqa: E402


@contextmanager
def private_broker(extra_config: str = "") -> Iterator[Broker]:
    """A mosquitto on a free port with its own persistence, stopped on exit."""
    with tempfile.TemporaryDirectory(prefix="lepton-bench-") as tmp:
        broker = Broker(workdir=Path(tmp), extra_config=extra_config)
        broker.start()
        try:
            yield broker
        finally:
            broker.kill()


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def write_section(title: str, section: str, path: Path) -> None:
    """Replace the section headed ``title`` (a ``## `` line) in the markdown file ``path`` with
    ``section``, or append it; the rest of the file is kept."""
    text = path.read_text()  # read right before writing: others edit this file too
    section = section.rstrip("\n") + "\n"
    start = text.find(title + "\n")
    if start < 0:
        new = text.rstrip("\n") + "\n\n" + section
    else:
        nxt = text.find("\n## ", start + len(title))
        new = text[:start] + section + ("\n" + text[nxt + 1 :] if nxt >= 0 else "")
    path.write_text(new)


def command_line(module: str, argv: list[str] | None) -> str:
    """How a benchmark was run, for its BENCHMARKS.md section (without ``--write-docs``)."""
    args = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--write-docs"]
    return " ".join(["python -m", module, *args])


def run_line(command: str) -> str:
    """The first line of a BENCHMARKS.md section: the command, the date and the machine
    (cores, architecture, load at the end of the run: figures on a shared host drift)."""
    return (
        f"`{command}` — {datetime.date.today().isoformat()}, {os.cpu_count()} cores "
        f"({platform.machine()}), load average {os.getloadavg()[0]:.1f} at the end of the run."
    )
