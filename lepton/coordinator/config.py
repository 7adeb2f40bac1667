"""The coordinator's configuration: one frozen object, loaded by :mod:`lepton.common.settings`.

Defaults, then a TOML file, then ``LEPTON_*`` environment variables, then explicit overrides
(CLI flags); each layer wins over the one before. Every key has a dotted name
(``mqtt.host``), a TOML location (``[mqtt] host``) and an environment variable
(``LEPTON_MQTT_HOST``). A key the schema does not know is an error naming the key, in the
file, in the overrides, and in the environment for variables under a section prefix
(``LEPTON_MQTT_HOSTT``); other ``LEPTON_*`` variables belong to other programs and are ignored.
Bounds are written on the types (``Positive``, ``Port``); rules across keys are in
:meth:`Config.__post_init__`.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import msgspec

from lepton.common import settings
from lepton.common.errors import ConfigError
from lepton.common.settings import env_name
from lepton.protocol.imports import Allowlist
from lepton.protocol.topics import validate_id

__all__ = ["CONFIG_ENV", "Config", "ConfigError", "env_name", "known_keys", "load"]

MqttProtocol = Literal["5", "3.1.1"]
BrokerAccountsKind = Literal["none", "dynsec"]
SolverMethod = Literal["auto", "exact", "fast", "random", "round_robin"]
ENV_PREFIX: Final = settings.ENV_PREFIX
# Not LEPTON_CONFIG: the agent reads that one, and both may run on one host in a demo.
CONFIG_ENV: Final = "LEPTON_COORDINATOR_CONFIG"

PositiveInt = Annotated[int, msgspec.Meta(gt=0)]
Positive = Annotated[float, msgspec.Meta(gt=0)]
NonNegative = Annotated[float, msgspec.Meta(ge=0)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]


@dataclass(frozen=True, slots=True, kw_only=True)
class DatabaseConfig:
    url: str = ""  # empty: a SQLite file in data_dir
    capacity_history: PositiveInt = 100
    sqlite_synchronous: Literal["full", "normal"] = "full"
    echo: bool = False
    auto_upgrade: bool = False  # migrate an older database at start-up (docs: Upgrading)


@dataclass(frozen=True, slots=True, kw_only=True)
class MqttConfig:
    host: str = "127.0.0.1"
    port: Port = 1883
    username: str = ""
    password: str = ""
    # A file holding the password (``lepton broker init`` writes one, mode 0600); read at
    # load. Give password or password_file, not both.
    password_file: str = ""
    tls: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    protocol: MqttProtocol = "5"
    client_id: str = ""  # empty: the username, else lepton-coordinator-{instance_id}
    keepalive_s: PositiveInt = 30
    session_expiry_s: int = 3600
    shared_subscriptions: bool = False
    shared_group: str = "lepton-coordinators"
    reconnect_min_s: Positive = 0.5
    reconnect_max_s: float = 30.0
    publish_timeout_s: Positive = 10.0
    # Who makes device accounts on the broker: "dynsec" (Mosquitto's dynamic security
    # plugin, through this connection; the account needs the plugin's admin rights) or
    # "none" (managed outside Lepton). See lepton.coordinator.auth.broker_accounts.
    # The default is "dynsec" (secure by default): on a broker without the plugin the
    # coordinator still runs, logs once at start what to configure, and refuses enrolments
    # (503 broker_unavailable).
    accounts: BrokerAccountsKind = "dynsec"
    accounts_timeout_s: Positive = 5.0

    def __post_init__(self) -> None:
        if self.password_file:
            object.__setattr__(self, "password", _read_password(self))


def _read_password(mqtt: MqttConfig) -> str:
    key = "mqtt.password_file"
    if mqtt.password:
        raise ConfigError("give mqtt.password or mqtt.password_file, not both", key=key)
    path = Path(mqtt.password_file).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"mqtt.password_file: cannot read {str(path)!r}: {exc}", key=key) from exc
    password = text.strip("\r\n")
    if not password or "\n" in password:
        raise ConfigError(f"mqtt.password_file {str(path)!r} must hold one non-empty line", key=key)
    return password


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpConfig:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: Port = 8080
    # How devices reach this API (blob downloads, update uploads); empty: the bound address.
    public_url: str = ""
    # Request bodies of JSON routes; upload routes enforce their own (larger) caps.
    max_body_bytes: PositiveInt = 1 << 20
    # The request line and headers together (h11 answers 400 above it).
    max_head_bytes: PositiveInt = 16 << 10
    # From the first byte of a connection or of a request until its head is complete.
    head_timeout_s: Positive = 10.0
    # The whole body of a JSON route; an upload gets one more second per
    # upload_min_bytes_per_s bytes received, so a slow link finishes but a stalled one does not.
    body_timeout_s: Positive = 30.0
    upload_min_bytes_per_s: PositiveInt = 16 << 10
    # Connections plus requests in progress; above it a request gets 503.
    max_concurrency: PositiveInt = 1000
    # /metrics on the API needs a token with scope metrics:read unless this is set; or serve
    # it apart, without a token, on metrics_host:metrics_port (0: no separate listener), for
    # a scraper on a private network.
    metrics_public: bool = False
    metrics_host: str = "127.0.0.1"
    metrics_port: Port = 0
    # HTTPS: the server's certificate (chain) and key, both or neither (``lepton ca init``
    # makes them); with a client CA, clients must present a certificate it signed.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert_file)


@dataclass(frozen=True, slots=True, kw_only=True)
class LivenessConfig:
    missed_reports: Positive = 3.0
    default_interval_s: Positive = 30.0
    max_check_s: Positive = 5.0


@dataclass(frozen=True, slots=True, kw_only=True)
class RegistryConfig:
    flush_interval_s: Positive = 0.25
    flush_max_batch: PositiveInt = 5000


@dataclass(frozen=True, slots=True, kw_only=True)
class SchedulerConfig:
    batch_interval_s: Positive = 1.0
    time_budget_s: Positive = 1.0
    method: SolverMethod = "auto"
    max_batch: PositiveInt = 2000
    weights: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.weights:  # numbers from the environment arrive as text
            object.__setattr__(self, "weights", _validate_weights(self.weights))


@dataclass(frozen=True, slots=True, kw_only=True)
class TasksConfig:
    default_expiry_s: Positive = 3600.0
    max_attempts: PositiveInt = 3
    retry_backoff_s: NonNegative = 5.0
    retry_backoff_max_s: float = 300.0
    ack_timeout_s: Positive = 60.0
    run_timeout_s: Positive = 3600.0
    redispatch_after_s: Positive = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplicaConfig:
    lease_s: Positive = 15.0


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
    max_load_attempts: PositiveInt = 2
    # Largest example count one update may claim, for jobs that set no lower cap.
    max_examples_per_update: PositiveInt = 100_000


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthConfig:
    """``[auth]``: who may call the API (docs/security.md)."""

    # Every caller is an administrator: for a local experiment on a private machine only.
    # Set by `lepton coordinator run --insecure`; logged loudly at start-up.
    insecure: bool = False
    # Audit records older than this are pruned by the leader (0: kept for ever).
    audit_retention_days: NonNegative = 90.0
    # What enrolled devices are told to connect to (it can differ from this coordinator's
    # own [mqtt] link: a public name, a TLS port). Empty / unset: the [mqtt] values.
    device_mqtt_host: str = ""
    device_mqtt_port: Port | None = None
    device_mqtt_tls: bool | None = None
    # The fleet CA (PEM) handed to devices at enrolment; with ca_key_file, device CSRs are
    # signed for cert_days (without it, an enrolment that sends a CSR gets 422 no_ca).
    ca_file: str = ""
    ca_key_file: str = ""
    cert_days: Annotated[int, msgspec.Meta(ge=1, le=397)] = 365  # pki.MAX_DEVICE_DAYS


@dataclass(frozen=True, slots=True, kw_only=True)
class ReleasesConfig:
    """``[releases]``: signed agent images and models published here (docs/releases.md)."""

    # The trust root (a signed root.json, `lepton release keys init` makes one) every
    # published bundle is checked against; read at each publish. Empty: publishing is off
    # (409 no_trust_root).
    root_file: str = ""
    # The largest bundle `POST /v1/releases` takes (413 above it, before it is stored).
    max_bundle_bytes: PositiveInt = 2 << 30


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
    auth: AuthConfig = field(default_factory=AuthConfig)
    releases: ReleasesConfig = field(default_factory=ReleasesConfig)

    def __post_init__(self) -> None:
        if not self.instance_id:
            host = socket.gethostname().split(".")[0] or "coordinator"
            object.__setattr__(self, "instance_id", host)
        _check(self)

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


def known_keys() -> dict[str, Any]:
    """Every dotted key and its declared type (``scheduler.weights`` is a table)."""
    return {name: key.hint for name, key in settings.keys(Config).items()}


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
            out[name] = {str(k): settings.coerce(f"{key}.{k}", float, v) for k, v in value.items()}
        else:
            out[name] = settings.coerce(key, float, value)
    try:
        CostWeights(**out)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"scheduler.weights: {exc}", key="scheduler.weights") from exc
    return out


def _check(cfg: Config) -> None:
    try:
        validate_id(cfg.fleet, what="fleet")
        validate_id(cfg.instance_id, what="instance_id")
    except Exception as exc:
        raise ConfigError(str(exc), key="fleet/instance_id") from exc
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
    for section, key in (
        ("mqtt", "ca_file"),
        ("mqtt", "cert_file"),
        ("mqtt", "key_file"),
        ("http", "tls_cert_file"),
        ("http", "tls_key_file"),
        ("http", "tls_client_ca_file"),
        ("releases", "root_file"),
    ):
        path = getattr(getattr(cfg, section), key)
        if path and not Path(path).expanduser().is_file():
            raise ConfigError(f"{section}.{key}: no such file {path!r}", key=f"{section}.{key}")
    if bool(cfg.http.tls_cert_file) != bool(cfg.http.tls_key_file):
        raise ConfigError(
            "http.tls_cert_file and http.tls_key_file go together", key="http.tls_cert_file"
        )
    if cfg.http.tls_client_ca_file and not cfg.http.tls:
        raise ConfigError(
            "http.tls_client_ca_file needs http.tls_cert_file and http.tls_key_file",
            key="http.tls_client_ca_file",
        )
    _check_auth(cfg.auth)


def _check_auth(auth: AuthConfig) -> None:
    for key in ("ca_file", "ca_key_file"):
        path = getattr(auth, key)
        if path and not Path(path).expanduser().is_file():
            raise ConfigError(f"auth.{key}: no such file {path!r}", key=f"auth.{key}")
    if auth.ca_key_file and not auth.ca_file:
        raise ConfigError("auth.ca_key_file needs auth.ca_file", key="auth.ca_key_file")


def load(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    override_label: Callable[[str], str] = lambda key: f"override {key}",
) -> Config:
    """Defaults -> TOML file (``path``, else ``$LEPTON_COORDINATOR_CONFIG``) -> environment ->
    ``overrides`` (dotted keys, from ``--set key=value`` and the run flags, which
    ``override_label`` names in errors)."""
    env = os.environ if env is None else env
    file = path if path is not None else env.get(CONFIG_ENV) or None
    return settings.load(
        Config,
        file=None if file is None else Path(file),
        env=env,
        overrides=overrides,
        override_label=override_label,
    )
