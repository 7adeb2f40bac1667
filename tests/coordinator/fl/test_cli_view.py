"""``lepton fl status``'s round table."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from lepton.coordinator.fl.cli import rounds_table


def _round(n: int, state: str, **kw: Any) -> dict[str, Any]:
    base = {"round": n, "state": state, "attempt": 1, "selected": 3, "accepted": 2}
    return {**base, "rejected": 0, "accuracy": 0.9, "loss": 0.3, "wall_s": 1.0, **kw}


def test_round_table_shows_open_counts_and_folded_late_updates() -> None:
    console = Console(record=True, width=120)
    console.print(
        rounds_table(
            [
                _round(1, "closed", late=None),
                _round(2, "closed", late=1),
                _round(3, "open", accepted=1, uploaded=2),
            ]
        )
    )
    lines = console.export_text().splitlines()
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in lines if "│" in line]
    row = {c[0]: c[3] for c in cells}
    assert row == {"1": "2", "2": "2 +1 late", "3": "1 (2 up)"}
