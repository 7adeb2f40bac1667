"""Persistence for the coordinator: SQLite by default, PostgreSQL by URL."""

from coordinator.store.devices import StateUpdate
from coordinator.store.records import (
    AckOutcome,
    Assignment,
    AttemptRecord,
    CancelOutcome,
    CancelSend,
    CapacityPoint,
    CapacitySample,
    DeviceRecord,
    Dispatch,
    Lease,
    NewTask,
    Observation,
    ResultOutcome,
    ResultRecord,
    RetryPolicy,
    TaskRecord,
)
from coordinator.store.store import Store
from coordinator.tasks.states import IN_FLIGHT, TASK_STATES, TERMINAL, TaskState

__all__ = [
    "IN_FLIGHT",
    "TASK_STATES",
    "TERMINAL",
    "AckOutcome",
    "Assignment",
    "AttemptRecord",
    "CancelOutcome",
    "CancelSend",
    "CapacityPoint",
    "CapacitySample",
    "DeviceRecord",
    "Dispatch",
    "Lease",
    "NewTask",
    "Observation",
    "ResultOutcome",
    "ResultRecord",
    "RetryPolicy",
    "StateUpdate",
    "Store",
    "TaskRecord",
    "TaskState",
]
