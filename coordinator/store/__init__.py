"""Persistence for the coordinator: SQLite by default, PostgreSQL by URL."""

from coordinator.store.devices import StateUpdate
from coordinator.store.records import (
    IN_FLIGHT,
    TASK_STATES,
    TERMINAL,
    AckOutcome,
    Assignment,
    AttemptRecord,
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
    TaskState,
)
from coordinator.store.store import Store

__all__ = [
    "IN_FLIGHT",
    "TASK_STATES",
    "TERMINAL",
    "AckOutcome",
    "Assignment",
    "AttemptRecord",
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
