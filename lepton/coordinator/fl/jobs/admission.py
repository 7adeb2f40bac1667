"""What a federated job may name on this server, checked when it is submitted.

A job names code the coordinator runs in its own process (the model factory, a callable
evaluation set) and files it reads (a ``.npz`` evaluation set). Neither may come from the
request alone: the operator's configuration (``[fl]``) decides.

- Import paths must match ``fl.allowed_imports`` (:class:`lepton.protocol.imports.Allowlist`
  patterns; default ``lepton.models.*``) or an entry point installed under ``lepton.plugins`` (when
  ``fl.plugins`` is on). The check reads the string only: nothing is imported to check it.
- A ``.npz`` evaluation set is read only from ``fl.eval_dir``: a name relative to it, or an
  absolute path inside it (symbolic links resolved). A path outside is refused with the same
  answer whether or not a file is there, and nothing outside is opened.

The same :class:`JobPolicy` is used again where the engine loads the job, so a job stored
before the list changed is held to the current list.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lepton.coordinator.config import Config
from lepton.coordinator.fl.jobs.spec import FLJob, JobError
from lepton.protocol.imports import Allowlist, ImportPathError


@dataclass(frozen=True, slots=True)
class JobPolicy:
    """The operator's limits on what jobs name (built once per process from ``[fl]``)."""

    allow: Allowlist
    eval_dir: Path
    max_examples_per_update: int = 100_000
    max_load_attempts: int = 2

    @classmethod
    def of(cls, cfg: Config) -> JobPolicy:
        allow = Allowlist(cfg.fl.allowed_imports)
        if cfg.fl.plugins:
            allow = allow.with_plugins()
        return cls(
            allow=allow,
            eval_dir=cfg.fl_eval_dir,
            max_examples_per_update=cfg.fl.max_examples_per_update,
            max_load_attempts=cfg.fl.max_load_attempts,
        )

    def admit(self, job: FLJob) -> None:
        """Raise :class:`JobError` (naming the key and why) unless the job may run here."""
        try:
            self.allow.check(job.model)
        except ImportPathError as exc:
            raise JobError("model", f"{exc.reason}: {exc}") from exc
        if job.eval is not None:
            self.check_eval(job.eval)

    def check_eval(self, spec: str) -> None:
        """Raise :class:`JobError` unless ``spec`` names an allowed evaluation set."""
        if spec.endswith(".npz"):
            self.eval_path(spec)
            return
        try:
            self.allow.check(spec)
        except ImportPathError as exc:
            raise JobError("eval", f"{exc.reason}: {exc}") from exc

    def eval_path(self, spec: str) -> Path:
        """The file a ``.npz`` evaluation set names, inside :attr:`eval_dir`; ``JobError``
        (the same for a file that exists and one that does not) when it is outside."""
        if "\x00" in spec:
            raise JobError("eval", "not a path")
        # realpath resolves symbolic links, so a link inside the directory that points out
        # of it is refused too; no file is opened here.
        root = os.path.realpath(self.eval_dir)
        path = os.path.realpath(os.path.join(root, os.path.expanduser(spec)))
        if os.path.commonpath([root, path]) != root or path == root:
            raise JobError(
                "eval",
                "a .npz evaluation set must be a file in the coordinator's evaluation "
                "directory (fl.eval_dir)",
            )
        return Path(path)
