"""Agent configuration: one frozen object, loaded by :mod:`lepton.common.settings`.

Defaults, then a TOML file, then ``LEPTON_*`` environment variables, then CLI flags; each
layer wins over the one before. The TOML file has sections (``[device]``, ``[broker]``,
``[agent]``, ``[outbox]``, ``[inference]``, ``[fetch]``, ``[endpoint]``,
``[update]``), each a nested
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

from lepton.agent import identity as ident
from lepton.agent.inference import access  # the standard library only: config stays light
from lepton.agent.origins import OriginError, Origins
from lepton.common import settings
from lepton.common.errors import ConfigError
from lepton.protocol.errors import TopicError
from lepton.protocol.imports import Allowlist
from lepton.protocol.topics import validate_id

__all__ = ["AgentConfig", "ConfigError", "UpdateConfig", "cli_options", "load_config"]

DEFAULT_CONFIG_PATH: Final = Path("/etc/lepton/agent.toml")
CONFIG_ENV: Final = "LEPTON_CONFIG"
DATA_SECTION: Final = "data"
_SOURCE_NAME_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")
#: Keys with no CLI flag: secrets, which a flag would show in the process list.
_NO_FLAG: Final = frozenset({"endpoint.token", "fetch.http_token"})

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
    # This device's token (from enrolment, or LEPTON_FETCH_HTTP_TOKEN): sent as
    # ``Authorization: Bearer`` to the coordinator's origin only, never to fetch.origins.
    http_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class EndpointConfig:
    """``[endpoint]``: the local inference API; off unless a port or a socket is set.

    TCP listens on loopback only unless ``allow_remote`` (which then needs a token); the
    Unix socket gets ``socket_mode`` and ``socket_group``; a token (``token_file``, or
    ``LEPTON_ENDPOINT_TOKEN``) makes every route but health ask for ``Bearer <token>``.
    The checks are in :mod:`lepton.agent.inference.access`.
    """

    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] | None = None  # 0: any free port
    # A host that is not loopback is refused unless this is set (and a token is configured).
    allow_remote: bool = False
    socket: Path | None = None
    # Octal: "0660" (a string) or 0o660 (a TOML octal); normalised to the int bits.
    socket_mode: int | str = 0o660
    # A group name or gid; unset: the agent's own (effective) group.
    socket_group: str | int | None = None
    # A file holding the bearer token, readable by its owner only (mode 0600 or 0400).
    token_file: Path | None = None
    # The token itself, from the environment only (LEPTON_ENDPOINT_TOKEN): never in a file.
    token: str | None = field(default=None, repr=False)
    # Whether GET /v1/health answers without the token (status only, no model names).
    open_health: bool = True
    max_body_bytes: PositiveInt = 16 * 1024 * 1024
    concurrency: PositiveInt = 2
    max_connections: PositiveInt = 64
    # Seconds a request (the wait for it, headers and body together) may take to arrive.
    request_timeout_s: Positive = 10.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "socket_mode", access.parse_socket_mode(self.socket_mode))
        if self.socket_group is not None:
            access.resolve_group(self.socket_group)  # a group that does not exist: refused
        if self.token is not None and self.token_file is not None:
            raise ConfigError(
                "endpoint.token and endpoint.token_file are both set; keep one",
                key="endpoint.token",
            )
        if self.token is not None:
            access.check_token(self.token, "endpoint.token")
        if self.token_file is not None:
            access.read_token_file(self.token_file)  # refused now, not at the first request
        if self.port is not None and not self.allow_remote:
            wide = access.non_loopback_addresses(self.host, self.port)
            if wide:
                raise ConfigError(
                    f"endpoint.host: {self.host!r} is not a loopback address "
                    f"({', '.join(wide)}); the endpoint listens on 127.0.0.1, ::1 or "
                    "localhost unless endpoint.allow_remote = true (which also needs "
                    "endpoint.token_file or LEPTON_ENDPOINT_TOKEN)",
                    key="endpoint.host",
                )
        if self.allow_remote and self.port is not None and not self.has_token:
            raise ConfigError(
                "endpoint.allow_remote needs a token: set endpoint.token_file "
                "(or LEPTON_ENDPOINT_TOKEN)",
                key="endpoint.allow_remote",
            )
        if self.socket is not None and self.mode & 0o002 and not self.has_token:
            raise ConfigError(
                f"endpoint.socket_mode {self.mode:04o} lets every local user connect; "
                "that needs a token (endpoint.token_file or LEPTON_ENDPOINT_TOKEN)",
                key="endpoint.socket_mode",
            )

    @property
    def enabled(self) -> bool:
        return self.port is not None or self.socket is not None

    @property
    def mode(self) -> int:
        """``socket_mode`` as permission bits."""
        return int(self.socket_mode)

    @property
    def gid(self) -> int:
        """The socket's group id (``socket_group``, else the agent's effective group)."""
        return access.resolve_group(self.socket_group)

    @property
    def has_token(self) -> bool:
        return self.token is not None or self.token_file is not None

    def bearer_token(self) -> str | None:
        """The token requests must carry, read now (a token file is checked again)."""
        if self.token_file is not None:
            return access.read_token_file(self.token_file)
        if self.token is not None:
            return access.check_token(self.token, "endpoint.token")
        return None


DEFAULT_UPDATE_ROOT: Final = Path("/opt/lepton")
DEFAULT_ROOT_FILE: Final = Path("/etc/lepton/release-root.json")


@dataclass(frozen=True, slots=True, kw_only=True)
class UpdateConfig:
    """``[update]``: signed agent images installed into A/B slots (:mod:`lepton.agent.update`).

    ``enabled`` unset: on when both ``root`` (the image root, ``/opt/lepton``) and
    ``root_file`` (the pinned trust root) exist. ``mode = "service"``: the privileged
    ``lepton-update.service`` installs and commits (a real device: the agent only writes
    requests); ``"direct"``: the agent owns ``root`` and runs the installer itself (tests,
    containers, boards without the privileged units)."""

    enabled: bool | None = None
    root: Path = DEFAULT_UPDATE_ROOT
    root_file: Path = DEFAULT_ROOT_FILE
    mode: Literal["service", "direct"] = "service"
    # Run after a switch or a rollback to start the other image (split on whitespace).
    restart_command: str = "systemctl restart --no-block lepton-agent.service"
    # How long a new image has to prove itself healthy unless its task says otherwise.
    health_deadline_s: Positive = 300.0

    @property
    def active(self) -> bool:
        """Whether updates are on (``enabled``, else whether root and root_file exist)."""
        if self.enabled is not None:
            return self.enabled
        return self.root.is_dir() and self.root_file.is_file()


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
    update: UpdateConfig = field(default_factory=UpdateConfig)
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
    identity: bool = True,
) -> AgentConfig:
    """Build the config from the layers. ``path`` None: ``$LEPTON_CONFIG``, else the default
    path if it exists. ``overrides`` are dotted keys (``broker.port``), as the CLI flags set.

    Then the device's identity, if ``<agent.state_dir>/identity.json`` exists (written by
    ``lepton-agent enroll``; mode 0600 or the agent refuses to start). It decides
    ``device.id``, ``device.fleet``, ``broker.username``, ``broker.password`` and
    ``fetch.http_token``: an explicit setting (file, environment or flag) that differs is a
    config error naming both, since the coordinator and the broker know the device only as
    enrolled. Where to connect (``broker.host``/``port``/``tls``/``ca_file``/``cert_file``/
    ``key_file``, ``fetch.coordinator_url``, ``fetch.ca_file``) it only fills in: an
    explicit setting wins (a broker reached through another name, say). ``identity=False``
    ignores the identity (enrolment itself).
    """
    env = os.environ if env is None else env
    if path is None and env.get(CONFIG_ENV):
        path = Path(env[CONFIG_ENV])
    if path is None and DEFAULT_CONFIG_PATH.exists():
        path = DEFAULT_CONFIG_PATH
    data = settings.read_toml(path) if path is not None else None
    # The endpoint's token and the device's HTTP token are secrets: a config file is often
    # world-readable and a flag shows in `ps`, so they come from the environment, a file of
    # their own (endpoint.token_file, identity.json) only.
    for key in _NO_FLAG:
        section, name = key.split(".")
        table = (data or {}).get(section)
        if isinstance(table, Mapping) and name in table:
            raise ConfigError(
                f"{path}: {key} is not read from a config file; use "
                f"{'endpoint.token_file' if section == 'endpoint' else 'lepton-agent enroll'} "
                f"or the environment variable {settings.env_name(key)}",
                key=key,
                source=str(path),
            )
        if overrides and overrides.get(key) is not None:
            raise ConfigError(
                f"{key} cannot be a flag (it would show in the process list); use "
                f"the environment variable {settings.env_name(key)}",
                key=key,
            )

    def build(layer: Mapping[str, Any] | None) -> AgentConfig:
        return settings.load(
            AgentConfig,
            data=layer,
            data_source=str(path),
            env=env,
            overrides=overrides,
            override_label=lambda key: f"flag {settings.flag_name(key)}",
        )

    config = build(data)
    found = ident.read_identity(config.agent.state_dir) if identity else None
    if found is None:
        return _token_has_a_home(config)
    explicit = ident.explicit_keys(data, env, overrides, settings.keys(AgentConfig))
    merged = ident.layered(data, ident.identity_layer(found), explicit, config, found)
    return _token_has_a_home(build(merged))


def _token_has_a_home(config: AgentConfig) -> AgentConfig:
    # Checked on the final config (the identity may bring the URL a token set by env needs).
    if config.fetch.http_token is not None and not config.fetch.coordinator_url:
        raise ConfigError(
            "fetch.http_token is set but fetch.coordinator_url is not: the token is sent "
            "to the coordinator's origin only, so it needs to know where that is",
            key="fetch.coordinator_url",
        )
    return config


def cli_options() -> list[tuple[str, str, Any]]:
    """(flag, dotted key, type hint) for every key, for the CLI to expose."""
    return [
        (settings.flag_name(name), name, key.hint)
        for name, key in settings.keys(AgentConfig).items()
        if name not in _NO_FLAG
    ]
