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

A job is read by :mod:`lepton.common.settings`, as the agent's and the coordinator's configs
are: types and bounds are written on the fields, and a key this module does not know is an
error naming it (:class:`JobError`, a ``ConfigError`` and a ``ValueError``, with ``key``
set). The rules across keys are in :func:`_check`. Every check that needs no I/O happens
here, at the edge, including building the strategy once, so a job that validates can run.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from msgspec import Meta

from lepton.common import settings
from lepton.common.errors import ConfigError
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


#: One sample's shape: 1 to MAX_SHAPE_DIMS sizes, each at least 1.
Shape = Annotated[
    tuple[Annotated[int, Meta(ge=1)], ...],
    Meta(
        min_length=1,
        max_length=MAX_SHAPE_DIMS,
        description=f"a list of sizes >= 1, at most {MAX_SHAPE_DIMS} dimensions",
    ),
]


class JobError(ConfigError, ValueError):
    """A job spec is invalid; ``key`` names the offending key (dotted for tables)."""

    key: str  # always set, unlike a ConfigError's

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}", key=key, source=JOB_SOURCE)

    @classmethod
    def of(cls, exc: ConfigError) -> JobError:
        """The loader's error, as a job's (``job`` where it names no key)."""
        key = exc.key or "job"
        message = str(exc).removeprefix(f"{JOB_SOURCE}: ").removeprefix(f"{key}: ")
        if message == f"unknown key {key}":
            message = "unknown key"
        return cls(key, message)


JOB_SOURCE: Final = "job"


@dataclass(frozen=True, slots=True, kw_only=True)
class StrategySpec:
    """The aggregation strategy by name (see :data:`STRATEGIES`) and its knobs, passed to
    :func:`lepton.coordinator.fl.kernels.strategies.build` (``clip_norm`` wraps it in clipping)."""

    name: str = "fedavg"
    knobs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class FairnessSpec:
    """Fairness rules of cost-model selection (:class:`~.selection.Fairness`)."""

    max_staleness: Annotated[int, Meta(ge=1, le=MAX_ROUNDS)] | None = 5
    max_forced_share: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.25
    penalty: Annotated[float, Meta(ge=0.0, le=1e6)] = 0.0
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
    max_rounds: Annotated[int, Meta(ge=1, le=100)] = 2
    exponent: Annotated[float, Meta(ge=0.0, le=10.0)] = 0.5

    def takes(self, rounds_late: int) -> bool:
        """Whether an update this many rounds late is folded in (rather than refused)."""
        return self.policy == "fold" and 0 < rounds_late <= self.max_rounds

    def weight(self, staleness: int) -> float:
        return float((1.0 + staleness) ** -self.exponent)


@dataclass(frozen=True, slots=True, kw_only=True)
class DPSpec:
    """Central DP: clip each update to ``clip_norm``, add Gaussian noise of
    ``noise_multiplier * clip_norm``; epsilon is reported for ``delta``."""

    noise_multiplier: Annotated[float, Meta(ge=0.0, le=1e3)]
    clip_norm: Annotated[float, Meta(gt=0.0, le=1e9)]
    delta: Annotated[float, Meta(gt=0.0, le=1.0)] = 1e-5


@dataclass(frozen=True, slots=True, kw_only=True)
class FLJob:
    """A federated training job (see the module docstring for the file layout)."""

    name: Annotated[
        str,
        Meta(
            pattern=NAME_RE.pattern,
            description="1-48 letters, digits and ._- (starting with a letter or digit)",
        ),
    ]
    model: Annotated[
        str, Meta(pattern=FACTORY_RE.pattern, description="an import path 'package.module:factory'")
    ]
    data: Annotated[
        str, Meta(pattern=DATA_RE.pattern, description="a data source (1-64 of [A-Za-z0-9._:/-])")
    ]
    rounds: Annotated[int, Meta(ge=1, le=MAX_ROUNDS)] = 10
    clients_per_round: Annotated[int, Meta(ge=1, le=MAX_CLIENTS)] = 10
    # None: the strategy's minimum (at least 1); at most clients_per_round.
    min_results: Annotated[int, Meta(ge=1, le=MAX_CLIENTS)] | None = None
    over_select: Annotated[float, Meta(ge=0.0, le=10.0)] = 0.3
    selection: Selection = "cost"
    deadline_s: Annotated[float, Meta(gt=0.0, le=7 * 86400.0)] = 120.0
    # After the deadline, how long to wait for the result of an update already uploaded.
    result_grace_s: Annotated[float, Meta(ge=0.0, le=3600.0)] = 10.0
    # A round short of min_results at its deadline is extended (new devices asked) this many
    # times before the job fails.
    max_round_attempts: Annotated[int, Meta(ge=1, le=100)] = 3
    epochs: Annotated[int, Meta(ge=1, le=1000)] = 1
    batch_size: Annotated[int, Meta(ge=1, le=65536)] = 32
    lr: Annotated[float, Meta(gt=0.0, le=1e3)] = 0.01
    optimizer: Optimizer = "sgd"
    momentum: Annotated[float, Meta(ge=0.0, le=0.999)] = 0.0
    compression: Compression = "fp32"
    max_examples: Annotated[int, Meta(ge=1, le=2**31)] | None = None
    seed: Annotated[int, Meta(ge=0, le=2**62)] = 0
    # sha256 of a weights blob (protocol.weights, kind "weights") in the model registry's blob
    # store to start from, e.g. a centrally trained model; None: the model's fresh weights.
    initial_weights: (
        Annotated[
            str,
            Meta(pattern=SHA256_RE.pattern, description="the sha256 (64 hex digits) of a blob"),
        ]
        | None
    ) = None
    # .npz path with x and y, or "package.module:callable"
    eval: Annotated[str, Meta(min_length=1, max_length=1024)] | None = None
    # One sample's shape, when there is no eval set.
    input_shape: Shape | None = None
    # Local examples assumed for a device not yet heard from.
    examples_hint: Annotated[int, Meta(ge=1, le=2**31)] = 100
    # None: derived from the model's size.
    max_update_bytes: Annotated[int, Meta(ge=1024, le=1 << 34)] | None = None
    min_battery: Annotated[float, Meta(ge=0.0, le=100.0)] | None = None
    # Screening of updates (finding 4 of the hardening review): the example count an
    # update is weighted by is clamped to this cap (None: the coordinator's
    # ``fl.max_examples_per_update``) and to ``examples_ratio`` times the round's median;
    # an update whose L2 norm is above ``norm_ratio`` times the round's median is refused.
    max_examples_per_update: Annotated[int, Meta(ge=1, le=2**31)] | None = None
    examples_ratio: Annotated[float, Meta(ge=1.0, le=1e6)] | None = 3.0
    norm_ratio: Annotated[float, Meta(ge=1.0, le=1e6)] | None = 3.0
    # Register the final model only if its central evaluation is not worse than the
    # starting weights' and the latest model registered under the job's name.
    final_check: bool = True
    final_format: FinalFormat = "onnx"
    strategy: StrategySpec = field(default_factory=StrategySpec)
    fairness: FairnessSpec = field(default_factory=FairnessSpec)
    late: LateSpec = field(default_factory=LateSpec)
    dp: DPSpec | None = None

    def __post_init__(self) -> None:
        _check(self)

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
        # ``to_dict`` writes null for an absent table; a section is then its defaults.
        tables = {k: v for k, v in data.items() if v is not None or k not in SECTIONS}
        if tables.get("strategy") is not None:
            tables["strategy"] = _strategy(tables["strategy"])
        try:
            return settings.load(cls, data=tables, data_source=JOB_SOURCE)
        except JobError:
            raise
        except ConfigError as exc:
            raise JobError.of(exc) from exc

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

SECTIONS: Final = frozenset({"strategy", "fairness", "late"})


def _strategy(value: Any) -> dict[str, Any]:
    """``strategy = "fedavg"`` or ``[strategy]`` (``name`` and the strategy's knobs) as the
    :class:`StrategySpec` table the loader reads."""
    if isinstance(value, str):
        return {"name": value}
    if not isinstance(value, Mapping):
        raise JobError("strategy", "must be a table with a name and the strategy's knobs")
    knobs = {str(k): v for k, v in value.items() if k != "name"}
    return {"name": value.get("name", "fedavg"), "knobs": knobs}


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


def _check(job: FLJob) -> None:
    """The rules across keys; types and bounds were checked by the loader."""
    if job.min_results is not None and job.min_results > job.clients_per_round:
        raise JobError(
            "min_results", f"must be at most clients_per_round ({job.clients_per_round})"
        )
    if job.input_shape is not None and math.prod(job.input_shape) > MAX_SAMPLE_ELEMENTS:
        raise JobError("input_shape", f"one sample may hold at most {MAX_SAMPLE_ELEMENTS} values")
    if job.late.policy == "fold" and job.dp is not None:
        raise JobError(
            "late.policy",
            "fold cannot be combined with [dp]: the privacy accounting assumes each round "
            "aggregates only the devices sampled for it",
        )
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
