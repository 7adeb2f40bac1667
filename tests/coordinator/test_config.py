"""Layered configuration: defaults -> TOML -> environment -> overrides, unknown keys refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from lepton.common.errors import ConfigError
from lepton.coordinator import config
from lepton.coordinator.config import Config, env_name, known_keys, load

REPO = Path(__file__).resolve().parents[2]


def test_defaults() -> None:
    cfg = load(env={})
    assert cfg.fleet == "default"
    assert cfg.mqtt.port == 1883
    assert cfg.instance_id  # the host name
    assert cfg.database_url.startswith("sqlite:///")
    assert cfg.database_url.endswith("var/coordinator/coordinator.db")
    assert cfg.mqtt_client_id == f"lepton-coordinator-{cfg.instance_id}"
    assert cfg.heartbeat_deadline_s(5.0) == 15.0
    assert cfg.heartbeat_deadline_s(None) == 90.0


def test_client_id_defaults_to_the_username() -> None:
    """The shipped broker config makes the username the client id; the coordinator says so."""
    cfg = load(env={}, overrides={"mqtt.username": "coordinator-2"})
    assert cfg.mqtt_client_id == "coordinator-2"
    explicit = load(env={}, overrides={"mqtt.username": "c", "mqtt.client_id": "x"})
    assert explicit.mqtt_client_id == "x"


def test_layers_in_order(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        'fleet = "lab"\n[mqtt]\nhost = "broker.lan"\nport = 8883\n'
        "[scheduler.weights]\nenergy = 0.5\n[scheduler.weights.power_w_by_class]\nrpi5 = 7\n"
    )
    env = {"LEPTON_MQTT_PORT": "1884", "LEPTON_SCHEDULER_WEIGHTS_TIME": "2", "LEPTON_API": "x"}
    cfg = load(path, env=env, overrides={"http.port": 9000, "scheduler.weights.battery": "1"})
    assert cfg.fleet == "lab"
    assert cfg.mqtt.host == "broker.lan"
    assert cfg.mqtt.port == 1884
    assert cfg.http.port == 9000
    assert dict(cfg.scheduler.weights) == {
        "energy": 0.5,
        "power_w_by_class": {"rpi5": 7.0},
        "time": 2.0,
        "battery": 1.0,
    }


def test_config_file_from_environment(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[http]\nport = 1234\n")
    assert load(env={"LEPTON_COORDINATOR_CONFIG": str(path)}).http.port == 1234


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("colour = 1\n", "colour"),
        ("[mqtt]\nhots = 'x'\n", "mqtt.hots"),
        ("[nonsense]\na = 1\n", "nonsense"),
        ("[scheduler.weights]\nspeed = 1\n", "scheduler.weights.speed"),
    ],
)
def test_unknown_keys_in_file_are_named(tmp_path: Path, toml: str, key: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load(path, env={})
    assert info.value.key == key
    assert key in str(info.value)


def test_unknown_environment_variable_under_a_section_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        load(env={"LEPTON_MQTT_HOSTT": "x"})
    assert info.value.key == "LEPTON_MQTT_HOSTT"
    # Variables of other programs (the agent's sections, the CLI's API URL) are not ours.
    load(env={"LEPTON_BROKER_HOST": "x", "LEPTON_API": "http://x", "LEPTON_AGENT_SLOTS": "2"})


def test_unknown_override_is_refused() -> None:
    with pytest.raises(ConfigError, match="nope"):
        load(env={}, overrides={"mqtt.nope": 1})


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"mqtt.port": "x"}, "mqtt.port"),
        ({"mqtt.port": 70000}, "mqtt.port"),
        ({"mqtt.protocol": "4"}, "mqtt.protocol"),
        ({"mqtt.tls": "maybe"}, "mqtt.tls"),
        ({"replica.lease_s": 0}, "replica.lease_s"),
        (
            {"mqtt.shared_subscriptions": True, "mqtt.protocol": "3.1.1"},
            "mqtt.shared_subscriptions",
        ),
        ({"scheduler.weights.time": -1}, "scheduler.weights"),
        ({"mqtt.ca_file": "/nonexistent/ca.pem"}, "mqtt.ca_file"),
        ({"fleet": "a/b"}, "fleet/instance_id"),
    ],
)
def test_invalid_values(overrides: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(env={}, overrides=overrides)
    assert info.value.key == key


def test_bad_toml(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[mqtt\n")
    with pytest.raises(ConfigError):
        load(path, env={})
    with pytest.raises(ConfigError):
        load(tmp_path / "missing.toml", env={})


def test_example_file_documents_every_key_and_loads() -> None:
    example = REPO / "deploy" / "coordinator.example.toml"
    text = example.read_text()
    cfg = load(example, env={})
    assert isinstance(cfg, Config)
    assert "[scheduler.weights]" in text
    for key in known_keys():
        if key == "scheduler.weights":
            continue
        name = key.rpartition(".")[2]
        assert f"\n{name} =" in text or f"\n# {name} =" in text, f"{key} is not documented"
        assert env_name(key) in text, env_name(key)
    from lepton.coordinator.scheduler.weights import CostWeights

    for name in CostWeights.__dataclass_fields__:
        assert f"{name} =" in text or f"[scheduler.weights.{name}]" in text, name


def test_redacted_hides_password() -> None:
    cfg = load(env={}, overrides={"mqtt.password": "s3cret"})
    assert cfg.redacted()["mqtt"]["password"] == "***"
    assert config.SECTIONS["mqtt"] is config.MqttConfig


def test_errors_name_where_the_value_came_from(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[http]\nport = 70000\n")
    with pytest.raises(ConfigError, match=r"http\.port: .*<= 65535 .*c\.toml") as info:
        load(path, env={})
    assert info.value.source == str(path)
    with pytest.raises(ConfigError, match="from env LEPTON_TASKS_MAX_ATTEMPTS") as info:
        load(env={"LEPTON_TASKS_MAX_ATTEMPTS": "0"})
    assert info.value.key == "tasks.max_attempts"


def test_mqtt_password_file_is_read_at_load(tmp_path: Path) -> None:
    secret = tmp_path / "coordinator.password"
    secret.write_text("s3cret\n")
    cfg = load(env={}, overrides={"mqtt.password_file": str(secret)})
    assert cfg.mqtt.password == "s3cret"
    assert cfg.redacted()["mqtt"]["password"] == "***"
    with pytest.raises(ConfigError, match="not both"):
        load(env={}, overrides={"mqtt.password_file": str(secret), "mqtt.password": "x"})
    with pytest.raises(ConfigError, match="cannot read"):
        load(env={}, overrides={"mqtt.password_file": str(tmp_path / "missing")})
    secret.write_text("\n")
    with pytest.raises(ConfigError, match="one non-empty line"):
        load(env={}, overrides={"mqtt.password_file": str(secret)})


def test_mqtt_accounts_is_dynsec_or_none() -> None:
    assert load(env={}).mqtt.accounts == "dynsec"  # secure by default
    assert load(env={"LEPTON_MQTT_ACCOUNTS": "none"}).mqtt.accounts == "none"
    with pytest.raises(ConfigError):
        load(env={}, overrides={"mqtt.accounts": "ldap"})
