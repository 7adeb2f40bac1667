"""One error root: every public exception class the packages define derives from LeptonError,
so callers can catch Lepton's own errors in one clause and tell them from bugs."""

from __future__ import annotations

import importlib
import pkgutil

from lepton.common.errors import LeptonError


def _modules() -> list[str]:
    root = importlib.import_module("lepton")
    found = pkgutil.walk_packages(root.__path__, prefix="lepton.")
    # __main__ modules run their command line when imported, and Alembic's env.py runs the
    # migrations (it needs Alembic's context, set up only by a migration run).
    skip = (".__main__", ".migrations.env")
    return ["lepton"] + [m.name for m in found if not m.name.endswith(skip)]


def test_every_public_exception_has_the_one_root() -> None:
    outside = []
    for name in _modules():
        module = importlib.import_module(name)
        for attr, obj in vars(module).items():
            if (
                isinstance(obj, type)
                and issubclass(obj, BaseException)
                and obj.__module__ == name
                and not attr.startswith("_")
                and not issubclass(obj, LeptonError)
            ):
                outside.append(f"{name}.{attr}")
    assert outside == [], f"exceptions outside LeptonError: {outside}"
