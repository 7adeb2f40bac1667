"""A federated job: one frozen, validated config, from a TOML file or the API's JSON body.

Both spell a job the same way: top-level keys, plus the tables ``[strategy]`` (``name`` and
the strategy's knobs), ``[fairness]`` (client selection's fairness rules), ``[late]``
(updates that arrive after their round closed) and ``[dp]`` (central differential privacy,
optional)::

    name = "digits"                      # the final model's name in the model registry
    model = "lepton.models.digits:DigitsCNN"    # import path of a zero-argument torch model factory
    data = "digits"                      # the data source each device holds
    rounds = 20
    clients_per_round = 10               # updates a round waits for
    min_results = 5                      # fewest updates a round closes with at its deadline
    over_select = 0.3                    # extra devices asked, to absorb stragglers
    selection = "cost"                   # "cost" (cost model + fairness) | "random"
    deadline_s = 60.0                    # per round, from its start
    epochs = 1
    batch_size = 32
    lr = 0.05
    optimizer = "sgd"                    # "sgd" | "adam"
    compression = "int8"                 # of updates: "fp32" | "fp16" | "int8"
    eval = "digits-test.npz"             # central evaluation set, optional: a .npz (x, y)
                                         # in the coordinator's fl.eval_dir, or an allowed
                                         # import path "package.module:callable"

    [strategy]
    name = "fedavgm"
    server_lr = 1.0

    [late]                               # updates that arrive after their round closed
    policy = "fold"                      # "drop" (default): refused | "fold": see LateSpec
    max_rounds = 2

A key this module does not know is an error naming it (``ValueError``, or
:class:`JobError` with ``key`` set). Every check that needs no I/O happens here, at the
edge, including building the strategy once, so a job that validates can run.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, get_args

from lepton.common.errors import LeptonError
from lepton.coordinator.fl.kernels.strategies import STRATEGIES, Strategy, build

Selection = Literal["cost", "random"]
Optimizer = Literal["sgd", "adam"]
Compression = Literal["fp32", "fp16", "int8"]
FinalFormat = Literal["onnx", "torch"]

NAME_RE: Final = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,47}\Z")
FACTORY_RE: Final = re.compile(r"\A[A-Za-z_][\w.]*:[A-Za-z_][\w.]*\Z")
DATA_RE: Final = re.compile(r"\A[A-Za-z0-9._:/-]{1,64}\Z")
SHA256_RE: Final = re.compile(r"\A[0-9a-f]{64}\Z")
MAX_ROUNDS: Final = 100_000
MAX_CLIENTS: Final = 10_000
#: A job spec is a table of tables of scalars (a strategy knob may be a short list): deeper
#: nesting, or more values than this in all, is refused before anything reads it.
MAX_DEPTH: Final = 4
MAX_VALUES: Final = 1_000
MAX_STRING: Final = 4096
#: One sample's shape (``input_shape``): at most this many dimensions and elements.
MAX_SHAPE_DIMS: Final = 8
MAX_SAMPLE_ELEMENTS: Final = 1 << 24


class JobError(LeptonError, ValueError):
    """A job spec is invalid; ``key`` names the offending key (dotted for tables)."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"{key}: {message}")


@dataclass(frozen=True, slots=True, kw_only=True)
class StrategySpec:
    """The aggregation strategy by name (see :data:`STRATEGIES`) and its knobs, passed to
    :func:`lepton.coordinator.fl.kernels.strategies.build` (``clip_norm`` wraps it in clipping)."""

    name: str = "fedavg"
    knobs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class FairnessSpec:
    """Fairness rules of cost-model selection (:class:`~.selection.Fairness`)."""

    max_staleness: int | None = 5
    max_forced_share: float = 0.25
    penalty: float = 0.0
    #: Close a round only once the devices the staleness floor forced into it are done (or
    #: at the deadline), so their updates count, not only their selection. Fairer, slower.
    wait_for_forced: bool = False


LatePolicy = Literal["drop", "fold"]


@dataclass(frozen=True, slots=True, kw_only=True)
class LateSpec:
    """What happens to an update that arrives after its round closed.

    ``drop``: it is refused (409 ``late``). ``fold``: if it is at most ``max_rounds``
    rounds late, it is accepted and aggregated with the next round to close, as an extra
    update weighted ``(1 + staleness) ** -exponent`` (staleness: rounds between the one it
    was trained for and the one it is counted in; Xie et al. 2019, FedBuff's 1/sqrt(1+s)
    with the default exponent). A round still waits for ``clients_per_round`` updates of
    its own; folded ones come on top, so slow devices count without every round waiting.
    """

    policy: LatePolicy = "drop"
    max_rounds: int = 2
    exponent: float = 0.5

    def takes(self, rounds_late: int) -> bool:
        """Whether an update this many rounds late is folded in (rather than refused)."""
        return self.policy == "fold" and 0 < rounds_late <= self.max_rounds

    def weight(self, staleness: int) -> float:
        return float((1.0 + staleness) ** -self.exponent)


@dataclass(frozen=True, slots=True, kw_only=True)
class DPSpec:
    """Central DP: clip each update to ``clip_norm``, add Gaussian noise of
    ``noise_multiplier * clip_norm``; epsilon is reported for ``delta``."""

    noise_multiplier: float
    clip_norm: float
    delta: float = 1e-5


@dataclass(frozen=True, slots=True, kw_only=True)
class FLJob:
    """A federated training job (see the module docstring for the file layout)."""

    name: str
    model: str
    data: str
    rounds: int = 10
    clients_per_round: int = 10
    min_results: int | None = None  # None: the strategy's minimum (at least 1)
    over_select: float = 0.3
    selection: Selection = "cost"
    deadline_s: float = 120.0
    # After the deadline, how long to wait for the result of an update already uploaded.
    result_grace_s: float = 10.0
    # A round short of min_results at its deadline is extended (new devices asked) this many
    # times before the job fails.
    max_round_attempts: int = 3
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.01
    optimizer: Optimizer = "sgd"
    momentum: float = 0.0
    compression: Compression = "fp32"
    max_examples: int | None = None
    seed: int = 0
    # sha256 of a weights blob (protocol.weights, kind "weights") in the model registry's blob
    # store to start from, e.g. a centrally trained model; None: the model's fresh weights.
    initial_weights: str | None = None
    eval: str | None = None  # .npz path with x and y, or "package.module:callable"
    input_shape: tuple[int, ...] | None = None  # one sample's shape, when there is no eval set
    examples_hint: int = 100  # local examples assumed for a device not yet heard from
    max_update_bytes: int | None = None  # None: derived from the model's size
    min_battery: float | None = None
    # Screening of updates (finding 4 of the hardening review): the example count an
    # update is weighted by is clamped to this cap (None: the coordinator's
    # ``fl.max_examples_per_update``) and to ``examples_ratio`` times the round's median;
    # an update whose L2 norm is above ``norm_ratio`` times the round's median is refused.
    max_examples_per_update: int | None = None
    examples_ratio: float | None = 3.0
    norm_ratio: float | None = 3.0
    # Register the final model only if its central evaluation is not worse than the
    # starting weights' and the latest model registered under the job's name.
    final_check: bool = True
    final_format: FinalFormat = "onnx"
    strategy: StrategySpec = field(default_factory=StrategySpec)
    fairness: FairnessSpec = field(default_factory=FairnessSpec)
    late: LateSpec = field(default_factory=LateSpec)
    dp: DPSpec | None = None

    def __post_init__(self) -> None:
        _validate(self)

    # ------------------------------------------------------------------ derived

    @property
    def needed(self) -> int:
        """Updates a round closes with at its deadline."""
        if self.min_results is not None:
            return self.min_results
        return min(self.clients_per_round, max(1, self.build_strategy().min_updates()))

    def build_strategy(self) -> Strategy:
        """A fresh strategy object for this job (state is restored separately)."""
        knobs = dict(self.strategy.knobs)
        if self.dp is not None:
            knobs["clip_norm"] = self.dp.clip_norm
            knobs["dp_noise_multiplier"] = self.dp.noise_multiplier
            knobs.setdefault("dp_expected_clients", self.clients_per_round)
        return build(self.strategy.name, **knobs)

    # ------------------------------------------------------------------ conversions

    def to_dict(self) -> dict[str, Any]:
        """Plain data in the file/API layout (what :meth:`from_mapping` reads back)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "strategy":
                out["strategy"] = {"name": value.name, **dict(value.knobs)}
            elif f.name in ("fairness", "late", "dp"):
                out[f.name] = None if value is None else dataclasses.asdict(value)
            elif f.name == "input_shape":
                out[f.name] = None if value is None else list(value)
            else:
                out[f.name] = value
        return out

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> FLJob:
        """A job from plain data (parsed TOML or JSON); ``JobError`` names a bad key."""
        if not isinstance(data, Mapping):
            raise JobError("job", "must be a table")
        _check_bounded(data)
        known = {f.name for f in dataclasses.fields(cls)}
        kw: dict[str, Any] = {}
        for key, value in data.items():
            if key not in known:
                raise JobError(str(key), "unknown key")
            if value is None and key in ("dp", "fairness", "late", "strategy"):
                continue
            if key == "strategy":
                kw[key] = _strategy(value)
            elif key in TABLES:
                kw[key] = _table(TABLES[key], key, value)
            elif key == "input_shape" and value is not None:
                kw[key] = _shape(value)
            else:
                kw[key] = value
        for required in ("name", "model", "data"):
            if required not in kw:
                raise JobError(required, "is required")
        try:
            return cls(**kw)
        except TypeError as exc:  # pragma: no cover - unknown keys are caught above
            raise JobError("job", str(exc)) from exc

    @classmethod
    def from_toml(cls, text_or_path: str | Path) -> FLJob:
        """A job from a TOML file (a :class:`Path`) or TOML text (a ``str``)."""
        if isinstance(text_or_path, Path):
            try:
                text = text_or_path.read_text()
            except OSError as exc:
                raise JobError("file", f"cannot read {text_or_path}: {exc}") from exc
        else:
            text = text_or_path
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise JobError("file", f"not valid TOML: {exc}") from exc
        return cls.from_mapping(data)


# ---------------------------------------------------------------------- parsing

TABLES: Final[dict[str, type[Any]]] = {"fairness": FairnessSpec, "late": LateSpec, "dp": DPSpec}


def _strategy(value: Any) -> StrategySpec:
    if isinstance(value, str):
        return StrategySpec(name=value)
    if not isinstance(value, Mapping):
        raise JobError("strategy", "must be a table with a name and the strategy's knobs")
    knobs = {str(k): v for k, v in value.items() if k != "name"}
    name = value.get("name", "fedavg")
    if not isinstance(name, str):
        raise JobError("strategy.name", "must be a string")
    return StrategySpec(name=name, knobs=knobs)


def _table(cls: type[Any], prefix: str, value: Any) -> Any:
    if not isinstance(value, Mapping):
        raise JobError(prefix, "must be a table")
    known = {f.name for f in dataclasses.fields(cls)}
    for key in value:
        if key not in known:
            raise JobError(f"{prefix}.{key}", "unknown key")
    try:
        return cls(**value)
    except TypeError as exc:
        raise JobError(prefix, str(exc)) from exc


def _check_bounded(data: Mapping[str, Any]) -> None:
    """Refuse specs nested deeper than :data:`MAX_DEPTH`, with more than :data:`MAX_VALUES`
    values or a string longer than :data:`MAX_STRING` (iteratively: no recursion to exhaust)."""
    stack: list[tuple[str, Any, int]] = [("job", data, 1)]
    seen = 0
    while stack:
        where, value, depth = stack.pop()
        seen += 1
        if seen > MAX_VALUES:
            raise JobError("job", f"more than {MAX_VALUES} values")
        if isinstance(value, str) and len(value) > MAX_STRING:
            raise JobError(where, f"longer than {MAX_STRING} characters")
        if isinstance(value, Mapping | list | tuple):
            if depth > MAX_DEPTH:
                raise JobError(where, f"nested deeper than {MAX_DEPTH} levels")
            if isinstance(value, Mapping):
                prefix = "" if where == "job" else f"{where}."
                items = [(f"{prefix}{k}", v) for k, v in value.items()]
            else:
                items = [(where, v) for v in value]
            stack.extend((w, v, depth + 1) for w, v in items)


def _shape(value: Any) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise JobError("input_shape", "must be a non-empty list of sizes")
    if len(value) > MAX_SHAPE_DIMS:
        raise JobError("input_shape", f"at most {MAX_SHAPE_DIMS} dimensions")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
        raise JobError("input_shape", "sizes must be integers >= 1")
    if math.prod(value) > MAX_SAMPLE_ELEMENTS:
        raise JobError("input_shape", f"one sample may hold at most {MAX_SAMPLE_ELEMENTS} values")
    return tuple(value)


# ---------------------------------------------------------------------- validation


def _int(key: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise JobError(key, f"must be an integer; got {value!r}")
    if not lo <= value <= hi:
        raise JobError(key, f"must be in [{lo}, {hi}]; got {value}")


def _num(key: str, value: Any, lo: float, hi: float, *, open_lo: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise JobError(key, f"must be a finite number; got {value!r}")
    if value < lo or value > hi or (open_lo and value == lo):
        bracket = "(" if open_lo else "["
        raise JobError(key, f"must be in {bracket}{lo:g}, {hi:g}]; got {value}")


def _choice(key: str, value: Any, literal: Any) -> None:
    choices = get_args(literal)
    if value not in choices:
        raise JobError(key, f"must be one of {', '.join(choices)}; got {value!r}")


def _validate(job: FLJob) -> None:  # noqa: PLR0912, PLR0915 - one check per field, in order
    if not isinstance(job.name, str) or not NAME_RE.match(job.name):
        raise JobError("name", "use 1-48 letters, digits and ._- (starting with a letter/digit)")
    if not isinstance(job.model, str) or not FACTORY_RE.match(job.model):
        raise JobError("model", "must be an import path 'package.module:factory'")
    if not isinstance(job.data, str) or not DATA_RE.match(job.data):
        raise JobError("data", "must name a data source (1-64 of [A-Za-z0-9._:/-])")
    _int("rounds", job.rounds, 1, MAX_ROUNDS)
    _int("clients_per_round", job.clients_per_round, 1, MAX_CLIENTS)
    if job.min_results is not None:
        _int("min_results", job.min_results, 1, job.clients_per_round)
    _num("over_select", job.over_select, 0.0, 10.0)
    _choice("selection", job.selection, Selection)
    _num("deadline_s", job.deadline_s, 0.0, 7 * 86400.0, open_lo=True)
    _num("result_grace_s", job.result_grace_s, 0.0, 3600.0)
    _int("max_round_attempts", job.max_round_attempts, 1, 100)
    _int("epochs", job.epochs, 1, 1000)
    _int("batch_size", job.batch_size, 1, 65536)
    _num("lr", job.lr, 0.0, 1e3, open_lo=True)
    _choice("optimizer", job.optimizer, Optimizer)
    _num("momentum", job.momentum, 0.0, 0.999)
    _choice("compression", job.compression, Compression)
    if job.max_examples is not None:
        _int("max_examples", job.max_examples, 1, 2**31)
    _int("seed", job.seed, 0, 2**62)
    if job.initial_weights is not None and (
        not isinstance(job.initial_weights, str) or not SHA256_RE.match(job.initial_weights)
    ):
        raise JobError("initial_weights", "must be the sha256 (64 hex digits) of a weights blob")
    if job.eval is not None and (not isinstance(job.eval, str) or not 0 < len(job.eval) <= 1024):
        raise JobError("eval", "must be a .npz path or an import path 'package.module:callable'")
    _int("examples_hint", job.examples_hint, 1, 2**31)
    if job.max_update_bytes is not None:
        _int("max_update_bytes", job.max_update_bytes, 1024, 1 << 34)
    if job.min_battery is not None:
        _num("min_battery", job.min_battery, 0.0, 100.0)
    if job.input_shape is not None:
        _shape(job.input_shape)
    if job.max_examples_per_update is not None:
        _int("max_examples_per_update", job.max_examples_per_update, 1, 2**31)
    if job.examples_ratio is not None:
        _num("examples_ratio", job.examples_ratio, 1.0, 1e6)
    if job.norm_ratio is not None:
        _num("norm_ratio", job.norm_ratio, 1.0, 1e6)
    if not isinstance(job.final_check, bool):
        raise JobError("final_check", "must be true or false")
    _choice("final_format", job.final_format, FinalFormat)
    f = job.fairness
    if f.max_staleness is not None:
        _int("fairness.max_staleness", f.max_staleness, 1, MAX_ROUNDS)
    _num("fairness.max_forced_share", f.max_forced_share, 0.0, 1.0)
    _num("fairness.penalty", f.penalty, 0.0, 1e6)
    if not isinstance(f.wait_for_forced, bool):
        raise JobError("fairness.wait_for_forced", "must be true or false")
    _choice("late.policy", job.late.policy, LatePolicy)
    _int("late.max_rounds", job.late.max_rounds, 1, 100)
    _num("late.exponent", job.late.exponent, 0.0, 10.0)
    if job.late.policy == "fold" and job.dp is not None:
        raise JobError(
            "late.policy",
            "fold cannot be combined with [dp]: the privacy accounting assumes each round "
            "aggregates only the devices sampled for it",
        )
    if job.dp is not None:
        _num("dp.noise_multiplier", job.dp.noise_multiplier, 0.0, 1e3)
        _num("dp.clip_norm", job.dp.clip_norm, 0.0, 1e9, open_lo=True)
        _num("dp.delta", job.dp.delta, 0.0, 1.0, open_lo=True)
    if job.strategy.name not in STRATEGIES:
        raise JobError(
            "strategy.name",
            f"unknown strategy {job.strategy.name!r} (known: {', '.join(sorted(STRATEGIES))})",
        )
    try:
        strategy = job.build_strategy()
    except (ValueError, TypeError) as exc:
        raise JobError("strategy", str(exc)) from exc
    if job.min_results is not None and job.min_results < strategy.min_updates():
        raise JobError(
            "min_results",
            f"{strategy.name} needs at least {strategy.min_updates()} updates per round",
        )
    if job.clients_per_round < strategy.min_updates():
        raise JobError(
            "clients_per_round",
            f"{strategy.name} needs at least {strategy.min_updates()} updates per round",
        )
