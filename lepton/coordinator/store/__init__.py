"""Persistence for the coordinator: SQLite by default, PostgreSQL by URL."""

from lepton.coordinator.store.devices import StateUpdate
from lepton.coordinator.store.records import (
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
from lepton.coordinator.store.store import Store
from lepton.coordinator.tasks.states import IN_FLIGHT, TASK_STATES, TERMINAL, TaskState

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
