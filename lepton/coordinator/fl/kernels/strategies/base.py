"""The strategy interface: turn one round's client updates into the next global weights.

A round, as the coordinator runs it::

    knobs = strategy.configure_fit(round_no)          # merged into each client's train params
    ...clients train and upload; each update is decoded into a ClientUpdate...
    result = strategy.aggregate(global_weights, updates)
    persist(result.weights, result.state)             # in one transaction
    # after a restart: strategy.load_state(persisted_state)

:meth:`Strategy.aggregate` first screens the updates (:func:`screen_updates`): an update
whose tensors do not match the global weights (names, shapes), that holds non-finite values,
reports no examples or repeats a device is left out and named in
:attr:`AggregateResult.rejected`, so one bad client never fails a round. It then calls
:meth:`Strategy.combine` (the aggregation rule: a weighted mean, a median, Krum...) for the
aggregated update, and :meth:`Strategy.step` (the server update: plain addition, or a server
optimizer with state) for the new weights.

Strategies with server state (optimizer moments, a privacy ledger) expose it as named arrays
through :meth:`Strategy.state` and take it back with :meth:`Strategy.load_state`; the state
changes only in :meth:`Strategy.step`, the last thing :meth:`Strategy.aggregate` does.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from lepton.common.errors import LeptonError
from lepton.coordinator.fl.kernels.aggregate import F64, apply_delta

Weights = Mapping[str, npt.NDArray[np.generic]]


class AggregationError(LeptonError):
    """A round cannot be aggregated (too few usable updates, say); ``reason`` is a token."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientUpdate:
    """One client's contribution to a round.

    ``delta`` is the client's locally trained weights minus the global weights it started
    from, per tensor. ``num_examples`` is the number of local training examples (it weights
    mean-based strategies; robust strategies ignore it, since a client can lie about it).
    ``metrics`` are numeric figures the client reported (``loss_after``, ``accuracy``...).
    ``weight`` scales the client's share in mean-based rules, on top of its examples: below
    1 for a late update trained on older global weights (:class:`~..job.LateSpec`).
    """

    device_id: str
    delta: Weights
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    weight: float = 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Combined:
    """What an aggregation rule produced: the aggregated update and who contributed to it."""

    delta: dict[str, F64]
    contributors: list[str]
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class AggregateResult:
    """The outcome of one round's aggregation.

    - ``weights``: the new global weights (each tensor in the global weights' dtype);
    - ``update``: the aggregated client update (float64) the server step was given;
    - ``contributors``: device ids whose updates entered the aggregate (Krum keeps a few);
    - ``rejected``: device id -> reason, for updates screened out;
    - ``num_examples``: examples behind the accepted updates;
    - ``metrics``: example-weighted means of the clients' metrics (``client.<name>``) and
      the strategy's own figures (``clip.fraction``, ``dp.noise_std``...);
    - ``state``: the strategy's state after this round (persist it with ``weights``).
    """

    weights: dict[str, npt.NDArray[np.generic]]
    update: dict[str, F64]
    contributors: list[str]
    rejected: dict[str, str]
    num_examples: int
    metrics: dict[str, float]
    state: dict[str, npt.NDArray[np.generic]]


def _tensor_problem(name: str, ref: npt.NDArray[np.generic], value: object) -> str | None:
    arr = np.asarray(value)
    if arr.shape != np.shape(ref):
        return f"tensor {name!r} has shape {list(arr.shape)}, expected {list(np.shape(ref))}"
    if arr.dtype.kind not in "biuf":
        return f"tensor {name!r} has dtype {arr.dtype}"
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        return f"tensor {name!r} holds non-finite values"
    return None


def _problem(global_weights: Weights, update: ClientUpdate) -> str | None:
    if isinstance(update.num_examples, bool) or not isinstance(update.num_examples, int):
        return "num_examples is not an int"
    if update.num_examples < 1:
        return "no training examples"
    if not (isinstance(update.weight, (int, float)) and 0.0 < update.weight <= 1.0):
        return f"weight {update.weight!r} is not in (0, 1]"
    if set(update.delta) != set(global_weights):
        missing = sorted(set(global_weights) - set(update.delta))[:3]
        extra = sorted(set(update.delta) - set(global_weights))[:3]
        return f"tensor names differ (missing {missing}, unexpected {extra})"
    for name, ref in global_weights.items():
        if (problem := _tensor_problem(name, ref, update.delta[name])) is not None:
            return problem
    return None


def screen_updates(
    global_weights: Weights, updates: Sequence[ClientUpdate]
) -> tuple[list[ClientUpdate], dict[str, str]]:
    """Split updates into usable ones and ``{device_id: reason}`` for the others."""
    accepted: list[ClientUpdate] = []
    rejected: dict[str, str] = {}
    seen: set[str] = set()
    for update in updates:
        if update.device_id in seen:
            rejected[update.device_id] = "more than one update from this device"
            continue
        seen.add(update.device_id)
        problem = _problem(global_weights, update)
        if problem is None:
            accepted.append(update)
        else:
            rejected[update.device_id] = problem
    # A device that sent a good and a bad copy is out entirely: which one counts is unclear.
    accepted = [u for u in accepted if u.device_id not in rejected]
    return accepted, rejected


def client_metrics(updates: Sequence[ClientUpdate]) -> dict[str, float]:
    """Example-weighted mean of each finite numeric metric, over the updates reporting it."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for update in updates:
        for key, value in update.metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value):
                continue
            sums[key] = sums.get(key, 0.0) + float(value) * update.num_examples
            counts[key] = counts.get(key, 0) + update.num_examples
    return {f"client.{k}": sums[k] / counts[k] for k in sorted(sums) if counts[k]}


class Strategy(abc.ABC):
    """An aggregation rule (:meth:`combine`) plus a server update (:meth:`step`).

    ``by_mean`` is True for strategies whose rule is the example-weighted mean of the
    updates; central differential privacy can only wrap those. ``robust`` is True for rules
    that bound what one update can do to the aggregate by themselves (median, trimmed mean,
    Krum, centered clipping).
    """

    name: ClassVar[str]
    by_mean: ClassVar[bool] = False
    robust: ClassVar[bool] = False

    def bounds_influence(self) -> bool:
        """Whether this strategy bounds each update's influence itself (a robust rule, or
        clipping around any rule), so the coordinator's norm screen is left to it."""
        return self.robust

    def min_updates(self) -> int:
        """The fewest usable updates this strategy aggregates."""
        return 1

    def configure_fit(self, round_no: int) -> dict[str, Any]:
        """Knobs for the clients' ``train`` params this round (e.g. ``{"prox_mu": 0.01}``)."""
        del round_no
        return {}

    def aggregate(
        self, global_weights: Weights, updates: Sequence[ClientUpdate]
    ) -> AggregateResult:
        """Screen ``updates``, combine the usable ones and step the global weights.

        Raises :class:`AggregationError` if fewer than :meth:`min_updates` are usable;
        ``ValueError`` if ``global_weights`` is empty.
        """
        if not global_weights:
            raise ValueError("global_weights is empty")
        accepted, rejected = screen_updates(global_weights, updates)
        need = self.min_updates()
        if len(accepted) < need:
            raise AggregationError(
                "too_few_updates",
                f"{self.name} needs {need} usable updates, has {len(accepted)} "
                f"({len(rejected)} rejected)",
            )
        combined = self.combine(global_weights, accepted)
        weights = self.step(global_weights, combined.delta)
        used = set(combined.contributors)
        return AggregateResult(
            weights=weights,
            update=combined.delta,
            contributors=combined.contributors,
            rejected=rejected,
            num_examples=sum(u.num_examples for u in accepted if u.device_id in used),
            metrics={**client_metrics(accepted), **combined.metrics},
            state=self.state(),
        )

    @abc.abstractmethod
    def combine(self, global_weights: Weights, updates: Sequence[ClientUpdate]) -> Combined:
        """The aggregated update of screened ``updates`` (at least :meth:`min_updates`)."""

    def step(
        self, global_weights: Weights, delta: Mapping[str, F64]
    ) -> dict[str, npt.NDArray[np.generic]]:
        """The new global weights; the default adds the aggregated update."""
        return apply_delta(global_weights, delta)

    def state(self) -> dict[str, npt.NDArray[np.generic]]:
        """Server state to persist with the weights (copies; empty when stateless)."""
        return {}

    def load_state(self, state: Mapping[str, npt.NDArray[np.generic]]) -> None:
        """Restore what :meth:`state` returned. ``ValueError`` for keys this strategy lacks."""
        if state:
            raise ValueError(f"{self.name} keeps no state, got {sorted(state)[:5]}")


def delta_of(update: ClientUpdate) -> dict[str, F64]:
    """An update's tensors as float64 arrays."""
    return {k: np.asarray(v, dtype=np.float64) for k, v in update.delta.items()}
