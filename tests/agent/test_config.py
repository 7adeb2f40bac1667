from __future__ import annotations

from pathlib import Path

import pytest

from lepton.agent.config import load_config
from lepton.protocol.errors import ConfigError


def test_layers_defaults_toml_env_flags(tmp_path: Path) -> None:
    cfg_file = tmp_path / "agent.toml"
    cfg_file.write_text(
        '[device]\nid = "pi-01"\ntags = ["lab", "cam"]\n'
        '[broker]\nhost = "mqtt.example"\nport = 8883\n'
        "[agent]\nslots = 2\n"
    )
    cfg = load_config(
        cfg_file,
        env={"LEPTON_BROKER_PORT": "1884", "LEPTON_AGENT_SLOTS": "3"},
        overrides={"agent_slots": 4},
    )
    assert cfg.device_id == "pi-01"
    assert cfg.device_tags == ("lab", "cam")
    assert cfg.broker_host == "mqtt.example"
    assert cfg.broker_port == 1884  # env beats TOML
    assert cfg.agent_slots == 4  # flag beats env
    assert cfg.outbox_sync == "full"  # default


def test_unknown_key_is_named(tmp_path: Path) -> None:
    cfg_file = tmp_path / "agent.toml"
    cfg_file.write_text("[broker]\nhots = 'x'\n")
    with pytest.raises(ConfigError, match=r"unknown key broker\.hots") as info:
        load_config(cfg_file, env={})
    assert info.value.key == "broker.hots"


def test_unknown_section_and_env(tmp_path: Path) -> None:
    cfg_file = tmp_path / "agent.toml"
    cfg_file.write_text("[brokr]\nhost = 'x'\n")
    with pytest.raises(ConfigError, match=r"unknown section \[brokr\]"):
        load_config(cfg_file, env={})
    with pytest.raises(ConfigError, match="LEPTON_BROKER_HOTS"):
        load_config(None, env={"LEPTON_BROKER_HOTS": "x"})


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"LEPTON_BROKER_PORT": "abc"}, "broker_port"),
        ({"LEPTON_BROKER_PORT": "0"}, "broker_port"),
        ({"LEPTON_OUTBOX_SYNC": "sometimes"}, "outbox_sync"),
        ({"LEPTON_DEVICE_ID": "bad/id"}, "device_id"),
        ({"LEPTON_DEVICE_ID": "bad+id"}, "device_id"),
        ({"LEPTON_BROKER_TLS": "maybe"}, "broker_tls"),
        # Finding 5 of the hardening review: the broker makes the username the client id.
        ({"LEPTON_DEVICE_ID": "pi-1", "LEPTON_BROKER_USERNAME": "pi-2"}, "broker_username"),
    ],
)
def test_bad_values_are_refused_with_key(env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, env=env)
    assert info.value.key == key


def test_missing_file_is_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml", env={})


def test_example_config_loads() -> None:
    example = Path(__file__).resolve().parents[2] / "deploy" / "agent.example.toml"
    cfg = load_config(example, env={})
    assert cfg.device_fleet == "default"


def test_broker_username_is_the_device_id() -> None:
    cfg = load_config(None, env={"LEPTON_DEVICE_ID": "pi-1", "LEPTON_BROKER_USERNAME": "pi-1"})
    assert cfg.broker_username == cfg.device_id == "pi-1"
