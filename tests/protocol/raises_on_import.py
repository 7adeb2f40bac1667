"""A module that fails while importing (for tests/protocol/test_imports.py)."""

raise RuntimeError("no sensor attached")
