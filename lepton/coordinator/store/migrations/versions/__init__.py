"""The schema revisions, oldest first (``0001_baseline.py``, ...); see the package docstring."""
