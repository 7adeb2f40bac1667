"""The task states, defined once for the store, the API, the CLI and the demo.

```
pending -> assigned -> running -> succeeded | failed | expired | cancelled
```
(coordinator/README.md draws the retries and cancels between them.)
"""

from __future__ import annotations

from typing import Final, Literal, get_args

TaskState = Literal["pending", "assigned", "running", "succeeded", "failed", "expired", "cancelled"]
TASK_STATES: Final[tuple[TaskState, ...]] = get_args(TaskState)
#: States a task never leaves.
TERMINAL: Final[frozenset[TaskState]] = frozenset({"succeeded", "failed", "expired", "cancelled"})
#: States in which a device holds the task.
IN_FLIGHT: Final[tuple[TaskState, ...]] = ("assigned", "running")
#: The outcome of an attempt taken back because its device went offline.
DEVICE_OFFLINE: Final = "device_offline"
