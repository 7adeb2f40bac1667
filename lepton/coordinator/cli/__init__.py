"""The ``lepton`` command line (entry point ``lepton.coordinator.cli:main``)."""

from __future__ import annotations

import sys

from lepton.coordinator.cli.main import build_parser, main

__all__ = ["build_parser", "main", "run"]


def run() -> None:  # pragma: no cover - `python -m lepton.coordinator.cli`
    sys.exit(main())
