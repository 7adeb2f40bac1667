"""The coordinator's configuration: one frozen object, built in layers.

Defaults, then a TOML file, then ``LEPTON_*`` environment variables, then explicit overrides
(CLI flags); each layer wins over the one before. Every key has a dotted name
(``mqtt.host``), a TOML location (``[mqtt] host``) and an environment variable
(``LEPTON_MQTT_HOST``). A key this module does not know is an error naming the key, in the
file, in the overrides, and in the environment for variables under a section prefix
(``LEPTON_MQTT_HOSTT``); other ``LEPTON_*`` variables belong to other programs and are ignored.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, get_args, get_origin

from lepton.protocol.errors import ConfigError
from lepton.protocol.imports import Allowlist
from lepton.protocol.topics import validate_id

MqttProtocol = Literal["5", "3.1.1"]
SolverMethod = Literal["auto", "exact", "fast", "random", "round_robin"]
ENV_PREFIX = "LEPTON_"
# Not LEPTON_CONFIG: the agent reads that one, and both may run on one host in a demo.
CONFIG_ENV = "LEPTON_COORDINATOR_CONFIG"


@dataclass(frozen=True, slots=True, kw_only=True)
class DatabaseConfig:
    url: str = ""  # empty: a SQLite file in data_dir
    capacity_history: int = 100
    sqlite_synchronous: Literal["full", "normal"] = "full"
    echo: bool = False
    auto_upgrade: bool = False  # migrate an older database at start-up (docs: Upgrading)


@dataclass(frozen=True, slots=True, kw_only=True)
class MqttConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    username: str = ""
    password: str = ""
    tls: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    protocol: MqttProtocol = "5"
    client_id: str = ""  # empty: the username, else lepton-coordinator-{instance_id}
    keepalive_s: int = 30
    session_expiry_s: int = 3600
    shared_subscriptions: bool = False
    shared_group: str = "lepton-coordinators"
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    publish_timeout_s: float = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpConfig:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8080
    # How devices reach this API (blob downloads, update uploads); empty: the bound address.
    public_url: str = ""
    # Request bodies of JSON routes; upload routes enforce their own (larger) caps.
    max_body_bytes: int = 1 << 20
    # The request line and headers together (h11 answers 400 above it).
    max_head_bytes: int = 16 << 10
    # From the first byte of a connection or of a request until its head is complete.
    head_timeout_s: float = 10.0
    # The whole body of a JSON route; an upload gets one more second per
    # upload_min_bytes_per_s bytes received, so a slow link finishes but a stalled one does not.
    body_timeout_s: float = 30.0
    upload_min_bytes_per_s: int = 16 << 10
    # Connections plus requests in progress; above it a request gets 503.
    max_concurrency: int = 1000


@dataclass(frozen=True, slots=True, kw_only=True)
class LivenessConfig:
    missed_reports: float = 3.0
    default_interval_s: float = 30.0
    max_check_s: float = 5.0


@dataclass(frozen=True, slots=True, kw_only=True)
class RegistryConfig:
    flush_interval_s: float = 0.25
    flush_max_batch: int = 5000


@dataclass(frozen=True, slots=True, kw_only=True)
class SchedulerConfig:
    batch_interval_s: float = 1.0
    time_budget_s: float = 1.0
    method: SolverMethod = "auto"
    max_batch: int = 2000
    weights: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class TasksConfig:
    default_expiry_s: float = 3600.0
    max_attempts: int = 3
    retry_backoff_s: float = 5.0
    retry_backoff_max_s: float = 300.0
    ack_timeout_s: float = 60.0
    run_timeout_s: float = 3600.0
    redispatch_after_s: float = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplicaConfig:
    lease_s: float = 15.0


@dataclass(frozen=True, slots=True, kw_only=True)
class FLConfig:
    """What federated jobs may name on this server (see docs/federated-learning.md)."""

    # Import patterns (protocol.imports.Allowlist) a job's model factory and a callable
    # evaluation set may name; checked when a job is submitted, before anything is imported.
    allowed_imports: tuple[str, ...] = ("lepton.models.*",)
    # Also allow the entry points installed under the ``lepton.plugins`` group.
    plugins: bool = True
    # The only directory a job's ``.npz`` evaluation set may be read from; empty:
    # ``<data_dir>/fl-eval``.
    eval_dir: str = ""
    # A job whose model code ended the coordinator this many times while it ran (an abort
    # no handler can catch) is failed as ``crashed_loader`` instead of run again.
    max_load_attempts: int = 2
    # Largest example count one update may claim, for jobs that set no lower cap.
    max_examples_per_update: int = 100_000


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """Everything one coordinator process needs; see ``deploy/coordinator.example.toml``."""

    instance_id: str = ""  # empty: the host name
    fleet: str = "default"
    data_dir: str = "var/coordinator"
    log_level: str = "INFO"
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    liveness: LivenessConfig = field(default_factory=LivenessConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    replica: ReplicaConfig = field(default_factory=ReplicaConfig)
    fl: FLConfig = field(default_factory=FLConfig)

    @property
    def database_url(self) -> str:
        """The configured URL, or a SQLite file under ``data_dir``."""
        if self.database.url:
            return self.database.url
        return f"sqlite:///{Path(self.data_dir).expanduser().resolve() / 'coordinator.db'}"

    @property
    def mqtt_client_id(self) -> str:
        """The configured client id; else the username, which the shipped broker config makes
        the client id anyway (``use_username_as_clientid``); else one from the instance id."""
        return self.mqtt.client_id or self.mqtt.username or f"lepton-coordinator-{self.instance_id}"

    def heartbeat_deadline_s(self, interval_s: float | None) -> float:
        """Seconds without a report after which a device counts as offline."""
        return self.liveness.missed_reports * (interval_s or self.liveness.default_interval_s)

    @property
    def fl_eval_dir(self) -> Path:
        """The directory federated jobs' ``.npz`` evaluation sets are read from."""
        if self.fl.eval_dir:
            return Path(self.fl.eval_dir).expanduser().resolve()
        return Path(self.data_dir).expanduser().resolve() / "fl-eval"

    def redacted(self) -> dict[str, Any]:
        """The configuration as plain data, with secrets masked (for logs and the API)."""
        data = dataclasses.asdict(self)
        if data["mqtt"]["password"]:
            data["mqtt"]["password"] = "***"  # noqa: S105 - a mask, not a password
        return data


SECTIONS: dict[str, type[Any]] = {
    f.name: typing.get_type_hints(Config)[f.name]
    for f in dataclasses.fields(Config)
    if dataclasses.is_dataclass(typing.get_type_hints(Config)[f.name])
}


def _hints(cls: type[Any]) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def known_keys() -> dict[str, Any]:
    """Every dotted key and its declared type (``scheduler.weights`` is a table)."""
    keys: dict[str, Any] = {}
    for name, hint in _hints(Config).items():
        if name in SECTIONS:
            for sub, sub_hint in _hints(SECTIONS[name]).items():
                keys[f"{name}.{sub}"] = sub_hint
        else:
            keys[name] = hint
    return keys


def env_name(key: str) -> str:
    """``mqtt.host`` -> ``LEPTON_MQTT_HOST``."""
    return ENV_PREFIX + key.replace(".", "_").upper()


# ---------------------------------------------------------------- coercion


def _coerce(key: str, hint: Any, value: Any) -> Any:  # noqa: PLR0911, PLR0912
    """Turn a TOML value or an environment/CLI string into the declared type."""
    origin = get_origin(hint)
    if origin is Literal:
        choices = get_args(hint)
        text = str(value)
        if text not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {text!r}", key=key)
        return text
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off", ""):
            return False
        raise ConfigError(f"{key} must be true or false; got {value!r}", key=key)
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be an integer; got {value!r}", key=key)
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be an integer; got {value!r}", key=key) from None
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number; got {value!r}", key=key)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be a number; got {value!r}", key=key) from None
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key} must be a string; got {value!r}", key=key)
        return str(value)
    if origin is tuple:  # tuple[str, ...]: a TOML list, or comma-separated from env/CLI
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
            raise ConfigError(f"{key} must be a list of strings; got {value!r}", key=key)
        return tuple(v.strip() for v in items if v.strip())
    if origin in (Mapping, dict) or hint is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a table", key=key)
        return dict(value)
    if origin in (types.UnionType, typing.Union):  # pragma: no cover - no optional keys today
        return value
    raise ConfigError(f"{key}: unsupported type {hint!r}", key=key)


def _flatten(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Nested TOML tables -> dotted keys; unknown keys are an error naming the key."""
    keys = known_keys()
    out: dict[str, Any] = {}
    for name, value in data.items():
        if name in SECTIONS:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: [{name}] must be a table", key=name)
            for sub, sub_value in value.items():
                dotted = f"{name}.{sub}"
                if dotted not in keys:
                    raise ConfigError(f"{source}: unknown key {dotted!r}", key=dotted)
                out[dotted] = sub_value
        elif name in keys:
            out[name] = value
        else:
            raise ConfigError(f"{source}: unknown key {name!r}", key=name)
    return out


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    keys = known_keys()
    by_env = {env_name(k): k for k in keys if k != "scheduler.weights"}
    weights_prefix = env_name("scheduler.weights") + "_"
    section_prefixes = tuple(f"{ENV_PREFIX}{s.upper()}_" for s in SECTIONS)
    out: dict[str, Any] = {}
    weights: dict[str, str] = {}
    for name, value in env.items():
        if name in by_env:
            out[by_env[name]] = value
        elif name.startswith(weights_prefix):
            weights[name[len(weights_prefix) :].lower()] = value
        elif name.startswith(section_prefixes):
            raise ConfigError(f"environment: unknown variable {name}", key=name)
    if weights:
        out["scheduler.weights"] = weights
    return out


def _validate_weights(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``scheduler.weights`` against the cost model's :class:`CostWeights`."""
    from lepton.coordinator.scheduler.weights import CostWeights

    hints = typing.get_type_hints(CostWeights)
    out: dict[str, Any] = {}
    for name, value in raw.items():
        key = f"scheduler.weights.{name}"
        if name not in hints:
            raise ConfigError(f"unknown key {key!r}", key=key)
        if name.endswith("_by_class"):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{key} must be a table of device class -> number", key=key)
            out[name] = {str(k): _coerce(f"{key}.{k}", float, v) for k, v in value.items()}
        else:
            out[name] = _coerce(key, float, value)
    try:
        CostWeights(**out)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"scheduler.weights: {exc}", key="scheduler.weights") from exc
    return out


#: Settings that must be > 0.
_POSITIVE: Final = (
    "liveness.missed_reports",
    "liveness.default_interval_s",
    "liveness.max_check_s",
    "registry.flush_interval_s",
    "registry.flush_max_batch",
    "scheduler.batch_interval_s",
    "scheduler.time_budget_s",
    "scheduler.max_batch",
    "tasks.default_expiry_s",
    "tasks.max_attempts",
    "tasks.ack_timeout_s",
    "tasks.run_timeout_s",
    "tasks.redispatch_after_s",
    "replica.lease_s",
    "mqtt.keepalive_s",
    "mqtt.publish_timeout_s",
    "database.capacity_history",
    "http.max_body_bytes",
    "http.max_head_bytes",
    "http.head_timeout_s",
    "http.body_timeout_s",
    "http.upload_min_bytes_per_s",
    "http.max_concurrency",
    "fl.max_load_attempts",
    "fl.max_examples_per_update",
)


def _check(cfg: Config) -> None:
    def positive(key: str, value: float) -> None:
        if not value > 0:
            raise ConfigError(f"{key} must be > 0; got {value!r}", key=key)

    try:
        validate_id(cfg.fleet, what="fleet")
        validate_id(cfg.instance_id, what="instance_id")
    except Exception as exc:
        raise ConfigError(str(exc), key="fleet/instance_id") from exc
    for key, port in (("mqtt.port", cfg.mqtt.port), ("http.port", cfg.http.port)):
        if not 0 <= port <= 65535:
            raise ConfigError(f"{key} must be 0..65535; got {port}", key=key)
    for key in _POSITIVE:
        section, _, name = key.partition(".")
        positive(key, getattr(getattr(cfg, section), name))
    if cfg.tasks.retry_backoff_s < 0 or cfg.tasks.retry_backoff_max_s < cfg.tasks.retry_backoff_s:
        raise ConfigError(
            "tasks.retry_backoff_s must be >= 0 and <= tasks.retry_backoff_max_s",
            key="tasks.retry_backoff_s",
        )
    if not 0 < cfg.mqtt.reconnect_min_s <= cfg.mqtt.reconnect_max_s:
        raise ConfigError(
            "mqtt.reconnect_min_s must be > 0 and <= mqtt.reconnect_max_s",
            key="mqtt.reconnect_min_s",
        )
    if cfg.mqtt.shared_subscriptions and cfg.mqtt.protocol != "5":
        raise ConfigError(
            'mqtt.shared_subscriptions needs mqtt.protocol = "5"', key="mqtt.shared_subscriptions"
        )
    if cfg.mqtt.shared_subscriptions:
        try:
            validate_id(cfg.mqtt.shared_group, what="mqtt.shared_group")
        except Exception as exc:
            raise ConfigError(str(exc), key="mqtt.shared_group") from exc
    try:
        Allowlist(cfg.fl.allowed_imports)
    except ValueError as exc:
        raise ConfigError(f"fl.allowed_imports: {exc}", key="fl.allowed_imports") from exc
    for key in ("ca_file", "cert_file", "key_file"):
        path = getattr(cfg.mqtt, key)
        if path and not Path(path).expanduser().is_file():
            raise ConfigError(f"mqtt.{key}: no such file {path!r}", key=f"mqtt.{key}")


def build(values: Mapping[str, Any]) -> Config:
    """A validated :class:`Config` from dotted keys (already merged across layers)."""
    keys = known_keys()
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for key, raw in values.items():
        if key not in keys:
            raise ConfigError(f"unknown key {key!r}", key=key)
        value = _coerce(key, keys[key], raw)
        if key == "scheduler.weights":
            value = _validate_weights(value)
        if "." in key:
            section, sub = key.split(".", 1)
            sections[section][sub] = value
        else:
            top[key] = value
    if not top.get("instance_id"):
        top["instance_id"] = socket.gethostname().split(".")[0] or "coordinator"
    cfg = Config(**top, **{name: SECTIONS[name](**kw) for name, kw in sections.items()})
    _check(cfg)
    return cfg


def load(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Defaults -> TOML file (``path``, else ``$LEPTON_COORDINATOR_CONFIG``) -> environment ->
    ``overrides`` (dotted keys, e.g. from CLI flags)."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    file = path if path is not None else env.get(CONFIG_ENV) or None
    if file is not None:
        try:
            with Path(file).expanduser().open("rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {file}: {exc}", key="config") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {file}: {exc}", key="config") from exc
        values.update(_flatten(data, str(file)))
    env_values = _from_env(env)
    if "scheduler.weights" in env_values and "scheduler.weights" in values:
        env_values["scheduler.weights"] = {
            **values["scheduler.weights"],
            **env_values["scheduler.weights"],
        }
    values.update(env_values)
    for key, value in (overrides or {}).items():
        if key.startswith("scheduler.weights."):
            weights = dict(values.get("scheduler.weights", {}))
            weights[key.removeprefix("scheduler.weights.")] = value
            values["scheduler.weights"] = weights
        else:
            values[key] = value
    return build(values)
