"""Model factories a test operator allows (``fl.allowed_imports``) that misbehave: one ends
the process the way no handler can catch, one raises. Finding 1 of the hardening review."""

from __future__ import annotations

import os
from typing import NoReturn


def aborting_model() -> NoReturn:
    """Ends the calling process with SIGABRT, like ``os:abort`` did to the coordinator."""
    os.abort()


def raising_model() -> NoReturn:
    raise RuntimeError("this factory always fails")
