"""Live progress of ``lepton-demo`` with rich: one row per stage, updated as it runs.

On a terminal the table redraws in place; elsewhere (a pipe, a CI log) each stage prints
one line when it ends, so the output stays readable.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import TracebackType
from typing import ClassVar

from rich.console import Console, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text


@dataclass
class _Row:
    title: str
    state: str = "waiting"  # waiting | running | done | skipped | failed
    total: int | None = None
    completed: int = 0
    detail: str = ""
    started: float | None = None
    ended: float | None = None

    @property
    def elapsed(self) -> str:
        if self.started is None:
            return ""
        return f"{(self.ended or time.monotonic()) - self.started:5.1f}s"


class LiveReporter:
    """Implements :class:`lepton.demo.loop.Reporter`; ``with LiveReporter(...) as r:``."""

    MARKS: ClassVar[dict[str, str]] = {
        "done": "[green]✔[/]",
        "skipped": "[yellow]-[/]",
        "failed": "[red]✘[/]",
        "waiting": " ",
    }

    def __init__(self, stages: tuple[tuple[str, str], ...], console: Console | None = None) -> None:
        self.console = console or Console()
        self.rows = {key: _Row(title) for key, title in stages}
        self._spinner = Spinner("dots", style="cyan")
        self._live: Live | None = None

    def __enter__(self) -> LiveReporter:
        if self.console.is_terminal:
            self._live = Live(self, console=self.console, refresh_per_second=8, transient=False)
            self._live.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._live is not None:
            self._live.__exit__(exc_type, exc, tb)
            self._live = None

    def __rich__(self) -> RenderableType:
        table = Table(box=None, show_header=False, padding=(0, 1), expand=False)
        table.add_column(width=2)
        table.add_column(style="bold", no_wrap=True)
        table.add_column(width=24, no_wrap=True)
        table.add_column(justify="right", no_wrap=True, style="dim")
        table.add_column(overflow="fold")
        for row in self.rows.values():
            mark: RenderableType = (
                self._spinner if row.state == "running" else Text.from_markup(self.MARKS[row.state])
            )
            bar: RenderableType = ""
            if row.total and row.state in ("running", "done"):
                table_bar = ProgressBar(total=row.total, completed=row.completed, width=14)
                bar = Table.grid(padding=(0, 1))
                bar.add_row(table_bar, f"{row.completed}/{row.total}")
            detail = Text(row.detail, style="red" if row.state == "failed" else "")
            table.add_row(mark, row.title, bar, row.elapsed, detail)
        return table

    # ------------------------------------------------------------------ Reporter

    def begin(self, stage: str, total: int | None = None, detail: str = "") -> None:
        row = self.rows[stage]
        row.state, row.total, row.detail, row.started = "running", total, detail, time.monotonic()

    def update(self, stage: str, completed: int | None = None, detail: str | None = None) -> None:
        row = self.rows[stage]
        if completed is not None:
            row.completed = completed
        if detail is not None:
            row.detail = detail

    def end(self, stage: str, detail: str = "") -> None:
        row = self.rows[stage]
        row.state, row.ended, row.detail = "done", time.monotonic(), detail
        if row.total:
            row.completed = max(row.completed, 0)
        self._line(row)

    def skip(self, stage: str, detail: str) -> None:
        row = self.rows[stage]
        if row.started is not None:
            row.ended = time.monotonic()
        row.state, row.detail = "skipped", detail
        self._line(row)

    def fail(self, stage: str, detail: str) -> None:
        row = self.rows.get(stage)
        if row is None:
            return
        row.state, row.ended, row.detail = "failed", time.monotonic(), detail
        self._line(row)

    def _line(self, row: _Row) -> None:
        if self._live is None:
            mark = {"done": "ok", "skipped": "skipped", "failed": "FAILED"}[row.state]
            self.console.print(
                f"[{mark}] {row.title} {row.elapsed.strip()}: {row.detail}",
                markup=False,
                highlight=False,
            )
