"""Cost model and assignment solver: pure code over devices and tasks, no I/O.

The coordinator service turns its registry and pending tasks into :class:`DeviceState` and
:class:`TaskSpec` values, asks :func:`plan` for a :class:`Plan`, and feeds every finished
task back into the :class:`ThroughputEstimator`.
"""

from lepton.coordinator.scheduler.bounds import makespan_lower_bound
from lepton.coordinator.scheduler.claims import ClaimLimits
from lepton.coordinator.scheduler.costmodel import CostComponents, CostModel, CostTerms
from lepton.coordinator.scheduler.estimator import ThroughputEstimator
from lepton.coordinator.scheduler.explain import Candidate, Explanation
from lepton.coordinator.scheduler.filters import REASONS, FilterReasons
from lepton.coordinator.scheduler.solver import METHODS, Method, Plan, plan
from lepton.coordinator.scheduler.types import DeviceState, TaskSpec
from lepton.coordinator.scheduler.weights import CostWeights

__all__ = [
    "METHODS",
    "REASONS",
    "Candidate",
    "ClaimLimits",
    "CostComponents",
    "CostModel",
    "CostTerms",
    "CostWeights",
    "DeviceState",
    "Explanation",
    "FilterReasons",
    "Method",
    "Plan",
    "TaskSpec",
    "ThroughputEstimator",
    "makespan_lower_bound",
    "plan",
]
