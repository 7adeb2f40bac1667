"""The exit codes of every ``lepton`` command, in one table (scripts branch on them)."""

from __future__ import annotations

from typing import Final

EXIT_OK: Final = 0
EXIT_ERROR: Final = 1  # anything else that went wrong
EXIT_USAGE: Final = 2  # bad arguments or configuration
EXIT_NOT_FOUND: Final = 3  # the device, task, job or model does not exist
EXIT_REFUSED: Final = 3  # `release verify|sign`: the bundle failed verification (release CLI)
EXIT_UNREACHABLE: Final = 4  # the coordinator did not answer
EXIT_TASK_FAILED: Final = 5  # a --wait'ed task ended failed, expired or cancelled
EXIT_GATE_FAILED: Final = 6  # a quantized model missed its accuracy gate
EXIT_TASK_FINISHED: Final = 7  # `tasks cancel`: the task had already ended
EXIT_SCHEMA: Final = 8  # the database is at another schema revision (`lepton db upgrade`)
EXIT_UNAUTHORIZED: Final = 9  # no token, a bad one, or one without the scope the call needs
EXIT_ROLLOUT_FAILED: Final = 10  # `rollout status --watch`: the rollout aborted or failed
EXIT_ROLLOUT_WAITING: Final = 11  # `rollout status --watch`: a phase waits for approval
EXIT_INTERRUPTED: Final = 130  # Ctrl-C (128 + SIGINT), as shells report it
