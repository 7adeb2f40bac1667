"""Agent configuration: one frozen object, loaded by :mod:`lepton.common.settings`.

Defaults, then a TOML file, then ``LEPTON_*`` environment variables, then CLI flags; each
layer wins over the one before. The TOML file has sections (``[device]``, ``[broker]``,
``[agent]``, ``[outbox]``, ``[inference]``, ``[fetch]``, ``[endpoint]``), each a nested
struct here (``cfg.broker.host``); the environment variable for ``broker.host`` is
``LEPTON_BROKER_HOST`` and the CLI flag ``--broker-host``. Unknown sections and keys are an
error that names them, so a typo never silently falls back to a default.

One table is different: ``[data]`` maps data source names to where the data is
(``digits = "/srv/data/digits.npz"``), and ``LEPTON_DATA_<NAME>`` adds or replaces one entry
(the name lower-cased); ``cfg.data`` holds it.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import msgspec

from lepton.agent.origins import OriginError, Origins
from lepton.common import settings
from lepton.common.errors import ConfigError
from lepton.protocol.errors import TopicError
from lepton.protocol.imports import Allowlist
from lepton.protocol.topics import validate_id

__all__ = ["AgentConfig", "ConfigError", "cli_options", "load_config"]

DEFAULT_CONFIG_PATH: Final = Path("/etc/lepton/agent.toml")
CONFIG_ENV: Final = "LEPTON_CONFIG"
DATA_SECTION: Final = "data"
_SOURCE_NAME_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")

PositiveInt = Annotated[int, msgspec.Meta(gt=0)]
Positive = Annotated[float, msgspec.Meta(gt=0)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]


def _default_device_id() -> str:
    name = re.sub(r"[^A-Za-z0-9._:-]", "-", socket.gethostname()).strip("-.") or "device"
    return name[:64]


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceConfig:
    """``[device]``: who this device is."""

    id: str = field(default_factory=_default_device_id)
    fleet: str = "default"
    class_: str | None = field(default=None, metadata={"key": "class"})
    tags: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokerConfig:
    """``[broker]``: the MQTT connection. With ``tls``, the broker must present a certificate
    for ``host`` that ``ca_file`` (else the system's trust store) signed; ``cert_file`` and
    ``key_file`` are this device's client certificate where the broker asks for one."""

    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(gt=0, le=65535)] = 1883
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    keepalive_s: PositiveInt = 30
    reconnect_min_s: Positive = 0.5
    reconnect_max_s: float = 30.0

    def __post_init__(self) -> None:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ConfigError(
                "broker.reconnect_max_s must be >= broker.reconnect_min_s",
                key="broker.reconnect_max_s",
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class DaemonConfig:
    """``[agent]``: the daemon itself."""

    state_dir: Path = Path("/var/lib/lepton")
    slots: PositiveInt = 1
    queue_limit: PositiveInt = 1000
    capacity_interval_s: Positive = 30.0
    capacity_min_interval_s: float = 2.0
    probe: bool = True
    drain_timeout_s: float = 30.0
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # Import paths a task may name as its model factory (protocol.imports.Allowlist
    # patterns); entry points of group ``lepton.plugins`` are always added.
    model_imports: tuple[str, ...] = ("lepton.models.*",)
    # A task that was running this many times when the agent died is failed as
    # ``crashed_agent`` at the next start instead of being run again.
    crash_limit: PositiveInt = 2

    def __post_init__(self) -> None:
        try:
            Allowlist(self.model_imports)
        except ValueError as exc:
            raise ConfigError(f"agent.model_imports: {exc}", key="agent.model_imports") from exc


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboxConfig:
    """``[outbox]``: results kept until the coordinator acknowledges them."""

    max_entries: PositiveInt = 100_000
    sync: Literal["full", "normal"] = "full"
    resend_after_s: Positive = 30.0


@dataclass(frozen=True, slots=True, kw_only=True)
class InferenceConfig:
    """``[inference]``: the models this device serves."""

    threads: NonNegativeInt = 0  # intra-op threads per model; 0: the cores this process may use
    providers: tuple[str, ...] = ()  # ONNX Runtime providers; empty: best available
    # ONNX Runtime's intra-op workers spin on a core for a while after each run, waiting for
    # the next one; on a device whose cores the application shares that burns CPU between
    # requests (docs/BENCHMARKS.md, thread-pool spinning), so it is off unless asked for.
    allow_spinning: bool = False
    max_model_bytes: PositiveInt = 512 * 1024 * 1024
    # Past these, the least recently used model is unloaded (and its files trimmed).
    max_models: PositiveInt = 8
    max_loaded_bytes: PositiveInt = 1024 * 1024 * 1024  # model file bytes, all served
    max_cache_bytes: PositiveInt = 2 * 1024 * 1024 * 1024  # cached model files on disk
    download_retries: NonNegativeInt = 5
    download_timeout_s: Positive = 30.0  # seconds without progress before a retry


@dataclass(frozen=True, slots=True, kw_only=True)
class FetchConfig:
    """``[fetch]``: where deploys and training tasks may download from and upload to: the
    coordinator's origin and these extra origins (``scheme://host[:port]``; ``:*`` any
    port). Neither set: every fetch is refused."""

    coordinator_url: str | None = None
    origins: tuple[str, ...] = ()
    # The CA that HTTPS origins must chain to (the fleet CA from enrolment); unset: the
    # system's trust store. Checked with the host name; a mismatch is refused, never retried.
    ca_file: Path | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class EndpointConfig:
    """``[endpoint]``: the local inference API; off unless a port or a socket is set."""

    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] | None = None  # 0: any free port
    socket: Path | None = None
    max_body_bytes: PositiveInt = 16 * 1024 * 1024
    concurrency: PositiveInt = 2
    max_connections: PositiveInt = 64
    # Seconds a request (the wait for it, headers and body together) may take to arrive.
    request_timeout_s: Positive = 10.0

    @property
    def enabled(self) -> bool:
        return self.port is not None or self.socket is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentConfig:
    """Everything the agent daemon reads at start-up."""

    device: DeviceConfig = field(default_factory=DeviceConfig)
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    agent: DaemonConfig = field(default_factory=DaemonConfig)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    endpoint: EndpointConfig = field(default_factory=EndpointConfig)
    # [data] name = "path-or-module:function"
    data: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            validate_id(self.device.id)
            validate_id(self.device.fleet, what="fleet")
        except TopicError as exc:
            raise ConfigError(str(exc), key="device.id") from exc
        try:
            self.origins  # noqa: B018 - validates the [fetch] keys
        except OriginError as exc:
            raise ConfigError(f"fetch: {exc}", key="fetch.origins") from exc
        if self.broker.username is not None and self.broker.username != self.device.id:
            # The broker binds the client id to the username (use_username_as_clientid) and
            # the ACL grants a device's topics to %u: a different username would take another
            # session and could publish nowhere under this device's id.
            raise ConfigError(
                f"broker.username must be the device id {self.device.id!r}; "
                f"got {self.broker.username!r}",
                key="broker.username",
            )
        object.__setattr__(self, "data", {k: v.strip() for k, v in self.data.items()})
        for name, spec in self.data.items():
            key = f"{DATA_SECTION}.{name}"
            if not _SOURCE_NAME_RE.fullmatch(name):
                raise ConfigError(
                    f"{key}: a data source name is 1-64 of A-Z a-z 0-9 . _ -", key=key
                )
            if not spec.strip():
                raise ConfigError(f"{key}: must be a non-empty string", key=key)

    @property
    def origins(self) -> Origins:
        """The origins fetches may reach (the coordinator's and ``fetch.origins``)."""
        return Origins.from_config(self.fetch.coordinator_url, self.fetch.origins)


def load_config(
    path: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> AgentConfig:
    """Build the config from the layers. ``path`` None: ``$LEPTON_CONFIG``, else the default
    path if it exists. ``overrides`` are dotted keys (``broker.port``), as the CLI flags set."""
    env = os.environ if env is None else env
    if path is None and env.get(CONFIG_ENV):
        path = Path(env[CONFIG_ENV])
    if path is None and DEFAULT_CONFIG_PATH.exists():
        path = DEFAULT_CONFIG_PATH
    return settings.load(
        AgentConfig,
        file=path,
        env=env,
        overrides=overrides,
        override_label=lambda key: f"flag {settings.flag_name(key)}",
    )


def cli_options() -> list[tuple[str, str, Any]]:
    """(flag, dotted key, type hint) for every key, for the CLI to expose."""
    return [
        (settings.flag_name(name), name, key.hint)
        for name, key in settings.keys(AgentConfig).items()
    ]
