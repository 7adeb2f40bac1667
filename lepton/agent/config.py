"""Agent configuration: one frozen object, layered defaults -> TOML -> LEPTON_* env -> CLI flags.

The TOML file has sections (``[device]``, ``[broker]``, ``[agent]``, ``[outbox]``,
``[inference]``, ``[fetch]``, ``[endpoint]``) whose keys map onto fields named ``section_key``; the
environment variable for a field is ``LEPTON_`` + the field name upper-cased
(``LEPTON_BROKER_HOST``), and the CLI flag is ``--section-key``. Unknown sections and keys are
an error that names them, so a typo never silently falls back to a default.

One table is different: ``[data]`` maps data source names to where the data is
(``digits = "/srv/data/digits.npz"``), and ``LEPTON_DATA_<NAME>`` adds or replaces one entry
(the name lower-cased). Both land in the ``data_sources`` field.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, NewType

from lepton.agent.origins import OriginError, Origins
from lepton.protocol.errors import ConfigError, TopicError
from lepton.protocol.imports import Allowlist
from lepton.protocol.topics import validate_id

DEFAULT_CONFIG_PATH: Final = Path("/etc/lepton/agent.toml")
ENV_PREFIX: Final = "LEPTON_"

#: Data source name -> path or ``module:function``, as sorted pairs (the config stays hashable).
DataSources = NewType("DataSources", tuple[tuple[str, str], ...])
DATA_SECTION: Final = "data"
_SOURCE_NAME_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _default_device_id() -> str:
    name = re.sub(r"[^A-Za-z0-9._:-]", "-", socket.gethostname()).strip("-.") or "device"
    return name[:64]


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentConfig:
    """Everything the agent daemon reads at start-up."""

    # [device]
    device_id: str = field(default_factory=_default_device_id)
    device_fleet: str = "default"
    device_class: str | None = None
    device_tags: tuple[str, ...] = ()
    # [broker]
    broker_host: str = "127.0.0.1"
    broker_port: int = 1883
    broker_username: str | None = None
    broker_password: str | None = None
    broker_tls: bool = False
    broker_ca_file: Path | None = None
    broker_cert_file: Path | None = None
    broker_key_file: Path | None = None
    broker_keepalive: int = 30
    broker_reconnect_min: float = 0.5
    broker_reconnect_max: float = 30.0
    # [agent]
    agent_state_dir: Path = Path("/var/lib/lepton")
    agent_slots: int = 1
    agent_queue_limit: int = 1000
    agent_capacity_interval: float = 30.0
    agent_capacity_min_interval: float = 2.0
    agent_probe: bool = True
    agent_drain_timeout: float = 30.0
    agent_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # Import paths a task may name as its model factory (protocol.imports.Allowlist
    # patterns); entry points of group ``lepton.plugins`` are always added.
    agent_model_imports: tuple[str, ...] = ("lepton.models.*",)
    # A task that was running this many times when the agent died is failed as
    # ``crashed_agent`` at the next start instead of being run again.
    agent_crash_limit: int = 2
    # [outbox]
    outbox_max_entries: int = 100_000
    outbox_sync: Literal["full", "normal"] = "full"
    outbox_resend_after: float = 30.0
    # [inference]
    inference_threads: int = 0  # intra-op threads per model; 0: the cores this process may use
    inference_providers: tuple[str, ...] = ()  # ONNX Runtime providers; empty: best available
    # ONNX Runtime's intra-op workers spin on a core for a while after each run, waiting for
    # the next one; on a device whose cores the application shares that burns CPU between
    # requests (docs/BENCHMARKS.md, thread-pool spinning), so it is off unless asked for.
    inference_allow_spinning: bool = False
    inference_max_model_bytes: int = 512 * 1024 * 1024
    # Past these, the least recently used model is unloaded (and its files trimmed).
    inference_max_models: int = 8
    inference_max_loaded_bytes: int = 1024 * 1024 * 1024  # model file bytes, all served
    inference_max_cache_bytes: int = 2 * 1024 * 1024 * 1024  # cached model files on disk
    inference_download_retries: int = 5
    inference_download_timeout: float = 30.0  # seconds without progress before a retry
    # [fetch] where deploys and training tasks may download from and upload to: the
    # coordinator's origin and these extra origins (``scheme://host[:port]``; ``:*`` any
    # port). Neither set: every fetch is refused.
    fetch_coordinator_url: str | None = None
    fetch_origins: tuple[str, ...] = ()
    # [endpoint] (local inference API; off unless a port or a socket is set)
    endpoint_host: str = "127.0.0.1"
    endpoint_port: int | None = None  # 0: any free port
    endpoint_socket: Path | None = None
    endpoint_max_body: int = 16 * 1024 * 1024
    endpoint_concurrency: int = 2
    endpoint_max_connections: int = 64
    # Seconds a request (the wait for it, headers and body together) may take to arrive.
    endpoint_request_timeout: float = 10.0
    # [data] name = "path-or-module:function"
    data_sources: DataSources = DataSources(())

    def __post_init__(self) -> None:
        try:
            validate_id(self.device_id)
            validate_id(self.device_fleet, what="fleet")
        except TopicError as exc:
            raise ConfigError(str(exc), key="device_id") from exc
        positive = {
            "broker_port": self.broker_port,
            "broker_keepalive": self.broker_keepalive,
            "agent_slots": self.agent_slots,
            "agent_queue_limit": self.agent_queue_limit,
            "agent_crash_limit": self.agent_crash_limit,
            "agent_capacity_interval": self.agent_capacity_interval,
            "outbox_max_entries": self.outbox_max_entries,
            "outbox_resend_after": self.outbox_resend_after,
            "broker_reconnect_min": self.broker_reconnect_min,
            "inference_max_model_bytes": self.inference_max_model_bytes,
            "inference_max_models": self.inference_max_models,
            "inference_max_loaded_bytes": self.inference_max_loaded_bytes,
            "inference_max_cache_bytes": self.inference_max_cache_bytes,
            "inference_download_timeout": self.inference_download_timeout,
            "endpoint_max_body": self.endpoint_max_body,
            "endpoint_concurrency": self.endpoint_concurrency,
            "endpoint_max_connections": self.endpoint_max_connections,
            "endpoint_request_timeout": self.endpoint_request_timeout,
        }
        for key, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{key} must be positive, got {value!r}", key=key)
        if self.broker_reconnect_max < self.broker_reconnect_min:
            raise ConfigError(
                "broker.reconnect_max must be >= reconnect_min", key="broker_reconnect_max"
            )
        if self.broker_port > 65535:
            raise ConfigError("broker.port must be <= 65535", key="broker_port")
        if self.endpoint_port is not None and not 0 <= self.endpoint_port <= 65535:
            raise ConfigError("endpoint.port must be in [0, 65535]", key="endpoint_port")
        try:
            self.origins  # noqa: B018 - validates the [fetch] keys
        except OriginError as exc:
            raise ConfigError(f"fetch: {exc}", key="fetch_origins") from exc
        try:
            Allowlist(self.agent_model_imports)
        except ValueError as exc:
            raise ConfigError(f"agent.model_imports: {exc}", key="agent_model_imports") from exc
        if self.broker_username is not None and self.broker_username != self.device_id:
            # The broker binds the client id to the username (use_username_as_clientid) and
            # the ACL grants a device's topics to %u: a different username would take another
            # session and could publish nowhere under this device's id.
            raise ConfigError(
                f"broker.username must be the device id {self.device_id!r}; "
                f"got {self.broker_username!r}",
                key="broker_username",
            )
        for key in ("inference_threads", "inference_download_retries"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must not be negative", key=key)

    @property
    def data_source_map(self) -> dict[str, str]:
        """``[data]`` as a dict: source name -> path or ``module:function``."""
        return dict(self.data_sources)

    @property
    def origins(self) -> Origins:
        """The origins fetches may reach (the coordinator's and ``fetch_origins``)."""
        return Origins.from_config(self.fetch_coordinator_url, self.fetch_origins)

    @property
    def endpoint_enabled(self) -> bool:
        return self.endpoint_port is not None or self.endpoint_socket is not None

    @property
    def state_dir(self) -> Path:
        return self.agent_state_dir


_FIELDS: Final = {f.name: f for f in dataclasses.fields(AgentConfig)}
_SECTIONS: Final = frozenset(name.split("_", 1)[0] for name in _FIELDS)


def _field_type(name: str) -> Any:
    return typing.get_type_hints(AgentConfig)[name]


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be a boolean")


def _to_int(value: Any) -> int:
    if isinstance(value, (bool, float)):
        raise TypeError("must be an integer")
    return int(value)


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise TypeError("must be a number")
    return float(value)


def _to_str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("must be a string")
    return value


def _to_str_tuple(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError("must be a list of strings")


def _to_sources(value: Any) -> DataSources:
    """A mapping, pairs, or ``name=spec,name=spec`` (CLI/env) -> sorted, validated pairs."""
    if isinstance(value, str):
        items: list[Any] = []
        for part in (p.strip() for p in value.split(",")):
            if part:
                if "=" not in part:
                    raise ValueError("entries must be name=path")
                items.append(tuple(s.strip() for s in part.split("=", 1)))
    elif isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, (list, tuple)):
        items = [tuple(v) for v in value]
    else:
        raise TypeError("must be a table of name = path")
    out: dict[str, str] = {}
    for item in items:
        if len(item) != 2:
            raise ValueError("entries must be (name, path) pairs")
        name, spec = item
        if not isinstance(name, str) or not _SOURCE_NAME_RE.fullmatch(name):
            raise ValueError(f"data source name {name!r} must be 1-64 of A-Z a-z 0-9 . _ -")
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(f"data source {name!r} must be a non-empty string")
        out[name] = spec.strip()
    return DataSources(tuple(sorted(out.items())))


_CONVERTERS: Final[dict[Any, Callable[[Any], Any]]] = {
    DataSources: _to_sources,
    bool: _to_bool,
    int: _to_int,
    float: _to_float,
    str: _to_str,
    Path: lambda v: v if isinstance(v, Path) else Path(_to_str(v)),
    tuple: _to_str_tuple,
}


def _coerce(name: str, value: Any) -> Any:
    """Convert a TOML/env/CLI value to the field's type, or raise ConfigError naming the key."""
    hint = _field_type(name)
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) and type(None) in args:
        hint = next(a for a in args if a is not type(None))
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
            return None
    origin = typing.get_origin(hint)
    try:
        if origin is Literal:
            if value not in typing.get_args(hint):
                raise ValueError(f"must be one of {typing.get_args(hint)}")  # noqa: TRY301
            return value
        return _CONVERTERS[origin or hint](value)
    except (TypeError, ValueError) as exc:
        label = name.replace("_", ".", 1)
        raise ConfigError(f"{label}: {exc} (got {value!r})", key=name) from exc


def _from_toml(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for section, table in data.items():
        if section not in _SECTIONS:
            raise ConfigError(f"{source}: unknown section [{section}]", key=section)
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: [{section}] must be a table", key=section)
        if section == DATA_SECTION:  # its keys are source names, not fields
            out["data_sources"] = _coerce("data_sources", table)
            continue
        for key, value in table.items():
            name = f"{section}_{key}"
            if name not in _FIELDS:
                raise ConfigError(f"{source}: unknown key {section}.{key}", key=f"{section}.{key}")
            out[name] = _coerce(name, value)
    return out


def _from_env(env: Mapping[str, str], base: DataSources | None = None) -> dict[str, Any]:
    """Fields from ``LEPTON_*``; ``LEPTON_DATA_<NAME>`` entries are merged onto ``base``."""
    out: dict[str, Any] = {}
    entries: list[tuple[str, str]] = []
    for var, value in env.items():
        if not var.startswith(ENV_PREFIX) or var in ("LEPTON_CONFIG", "LEPTON_API"):
            continue
        name = var[len(ENV_PREFIX) :].lower()
        if name.split("_", 1)[0] not in _SECTIONS:
            continue  # variables for other Lepton programs (the coordinator) share the prefix
        if name.startswith(f"{DATA_SECTION}_") and name != "data_sources":
            entries.append((name[len(DATA_SECTION) + 1 :], value))
            continue
        if name not in _FIELDS:
            raise ConfigError(f"unknown environment variable {var}", key=var)
        out[name] = _coerce(name, value)
    if entries:
        merged = dict(out.get("data_sources", base or ()))
        merged.update(entries)
        out["data_sources"] = _coerce("data_sources", merged)
    return out


def load_config(
    path: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> AgentConfig:
    """Build the config from the layers. ``path`` None means the default path if it exists."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    if path is None and env.get("LEPTON_CONFIG"):
        path = Path(env["LEPTON_CONFIG"])
    if path is None and DEFAULT_CONFIG_PATH.exists():
        path = DEFAULT_CONFIG_PATH
    if path is not None:
        try:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {path}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
        values.update(_from_toml(data, str(path)))
    values.update(_from_env(env, values.get("data_sources")))
    for name, value in (overrides or {}).items():
        if name not in _FIELDS:
            raise ConfigError(f"unknown option {name}", key=name)
        if value is not None:
            values[name] = _coerce(name, value)
    return AgentConfig(**values)


def cli_options() -> list[tuple[str, str, Any]]:
    """(flag, field name, type hint) for every field, for the CLI to expose."""
    return [(f"--{name.replace('_', '-')}", name, _field_type(name)) for name in _FIELDS]
