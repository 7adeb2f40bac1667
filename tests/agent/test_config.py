from __future__ import annotations

from pathlib import Path

import pytest

from lepton.agent.cli import _config as cli_config
from lepton.agent.cli import build_parser
from lepton.agent.config import AgentConfig, cli_options, load_config
from lepton.common.errors import ConfigError


def main_config(argv: list[str]) -> AgentConfig:
    """The config ``lepton-agent`` would run with, from its own flag parser."""
    return cli_config(build_parser().parse_args(argv))


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
        overrides={"agent.slots": 4},
    )
    assert cfg.device.id == "pi-01"
    assert cfg.device.tags == ("lab", "cam")
    assert cfg.broker.host == "mqtt.example"
    assert cfg.broker.port == 1884  # env beats TOML
    assert cfg.agent.slots == 4  # flag beats env
    assert cfg.outbox.sync == "full"  # default


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
        ({"LEPTON_BROKER_PORT": "abc"}, "broker.port"),
        ({"LEPTON_BROKER_PORT": "0"}, "broker.port"),
        ({"LEPTON_OUTBOX_SYNC": "sometimes"}, "outbox.sync"),
        ({"LEPTON_DEVICE_ID": "bad/id"}, "device.id"),
        ({"LEPTON_DEVICE_ID": "bad+id"}, "device.id"),
        ({"LEPTON_BROKER_TLS": "maybe"}, "broker.tls"),
        # Finding 5 of the hardening review: the broker makes the username the client id.
        ({"LEPTON_DEVICE_ID": "pi-1", "LEPTON_BROKER_USERNAME": "pi-2"}, "broker.username"),
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
    assert cfg.device.fleet == "default"


def test_broker_username_is_the_device_id() -> None:
    cfg = load_config(None, env={"LEPTON_DEVICE_ID": "pi-1", "LEPTON_BROKER_USERNAME": "pi-1"})
    assert cfg.broker.username == cfg.device.id == "pi-1"


def test_flags_are_derived_from_the_schema() -> None:
    flags = {flag: key for flag, key, _ in cli_options()}
    assert flags["--broker-reconnect-min-s"] == "broker.reconnect_min_s"
    assert flags["--device-class"] == "device.class"
    assert flags["--data"] == "data"
    cfg = main_config(
        ["run", "--broker-port", "1999", "--device-class", "rpi5", "--no-agent-probe"]
    )
    assert (cfg.broker.port, cfg.device.class_, cfg.agent.probe) == (1999, "rpi5", False)


def test_errors_name_the_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LEPTON_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="flag --agent-slots") as info:
        main_config(["run", "--agent-slots", "0"])
    assert info.value.key == "agent.slots"


def test_data_sources_from_file_env_and_flags(tmp_path: Path) -> None:
    cfg_file = tmp_path / "agent.toml"
    cfg_file.write_text('[data]\ndigits = "/srv/digits.npz"\n')
    cfg = load_config(
        cfg_file,
        env={"LEPTON_DATA_CAM": "cam.frames:load"},
        overrides={"data.extra": "/x.npz"},
    )
    assert cfg.data == {"digits": "/srv/digits.npz", "cam": "cam.frames:load", "extra": "/x.npz"}
    with pytest.raises(ConfigError) as info:
        load_config(None, env={"LEPTON_DATA_BAD/NAME": "x"})
    assert info.value.key == "data.bad/name"
