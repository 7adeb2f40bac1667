"""The one settings loader: layering, coercion, unknown keys and errors that name the source."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import pytest

from lepton.common.errors import ConfigError, LeptonError
from lepton.common.settings import coerce, env_name, flag_name, keys, load


@dataclass(frozen=True, slots=True, kw_only=True)
class Net:
    host: str = "localhost"
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 1883
    tls: bool = False
    timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    mode: Literal["fast", "safe"] = "safe"
    ca_file: Path | None = None
    tags: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    low: int
    high: int = 10

    def __post_init__(self) -> None:
        if self.high < self.low:
            raise ConfigError("limits.high must be >= limits.low", key="limits.high")


@dataclass(frozen=True, slots=True, kw_only=True)
class Schema:
    name: str = "x"
    net: Net = field(default_factory=Net)
    limits: Limits | None = None
    extra: dict[str, float] = field(default_factory=dict)
    kind: str | None = field(default=None, metadata={"key": "class"})


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_defaults_then_file_then_env_then_overrides(tmp_path: Path) -> None:
    assert load(Schema) == Schema()
    path = write(tmp_path, '[net]\nhost = "file"\nport = 1\ntls = true\ntimeout_s = 1\n')
    cfg = load(
        Schema,
        file=path,
        env={"LEPTON_NET_PORT": "2", "LEPTON_NET_TIMEOUT_S": "2.5"},
        overrides={"net.timeout_s": 3},
    )
    assert cfg.net.host == "file"  # only the file set it
    assert cfg.net.tls is True
    assert cfg.net.port == 2  # the environment beats the file
    assert cfg.net.timeout_s == 3.0  # an override beats the environment
    assert cfg.net.mode == "safe"  # the default


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1", True),
        ("yes", True),
        ("On", True),
        ("false", False),
        ("0", False),
        ("off", False),
    ],
)
def test_environment_booleans(text: str, value: bool) -> None:
    assert load(Schema, env={"LEPTON_NET_TLS": text}).net.tls is value


def test_environment_text_becomes_the_declared_type() -> None:
    cfg = load(
        Schema,
        env={
            "LEPTON_NET_PORT": " 8883 ",
            "LEPTON_NET_TAGS": "a, b,,c",
            "LEPTON_NET_CA_FILE": "/etc/ca.pem",
            "LEPTON_NET_MODE": "fast",
            "LEPTON_CLASS": "rpi5",
        },
    )
    assert cfg.net.port == 8883
    assert cfg.net.tags == ("a", "b", "c")
    assert cfg.net.ca_file == Path("/etc/ca.pem")
    assert cfg.net.mode == "fast"
    assert cfg.kind == "rpi5"  # a keyword-named key: [class] in files, .kind in code
    assert load(Schema, env={"LEPTON_NET_CA_FILE": "none"}).net.ca_file is None


def test_a_file_is_typed_and_its_strings_are_not_parsed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"net\.port: must be an integer") as info:
        load(Schema, file=write(tmp_path, '[net]\nport = "1884"\n'))
    assert info.value.key == "net.port"


def test_open_tables_take_whole_tables_and_single_entries(tmp_path: Path) -> None:
    path = write(tmp_path, "[extra]\na = 1\nb = 2.5\n")
    cfg = load(Schema, file=path, env={"LEPTON_EXTRA_C": "3"}, overrides={"extra.a": "4"})
    assert cfg.extra == {"a": 4.0, "b": 2.5, "c": 3.0}
    replaced = load(Schema, file=path, overrides={"extra": "z=1"})
    assert replaced.extra == {"z": 1.0}  # a whole table replaces the one before
    with pytest.raises(ConfigError, match=r"extra\.c: must be a number") as info:
        load(Schema, env={"LEPTON_EXTRA_C": "lots"})
    assert info.value.source == "env LEPTON_EXTRA_C"


def test_optional_sections_and_required_keys(tmp_path: Path) -> None:
    assert load(Schema).limits is None
    assert load(Schema, file=write(tmp_path, "[limits]\nlow = 2\n")).limits == Limits(low=2)
    with pytest.raises(ConfigError, match=r"limits\.low: is required") as info:
        load(Schema, file=write(tmp_path, "[limits]\nhigh = 2\n"))
    assert info.value.key == "limits.low"


@pytest.mark.parametrize(
    ("text", "message", "key"),
    [
        ("[nett]\nhost = 'x'\n", r"unknown section \[nett\]", "nett"),
        ("[net]\nhots = 'x'\n", r"unknown key net\.hots", "net.hots"),
        ("nme = 'x'\n", "unknown key nme", "nme"),
        ("net = 3\n", r"\[net\] must be a table", "net"),
    ],
)
def test_unknown_names_in_a_file_are_refused_by_name(
    tmp_path: Path, text: str, message: str, key: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        load(Schema, file=path)
    assert (info.value.key, info.value.source) == (key, str(path))
    assert str(path) in str(info.value)


def test_unknown_variables_under_a_section_are_refused_others_ignored() -> None:
    with pytest.raises(ConfigError, match="LEPTON_NET_HOTS") as info:
        load(Schema, env={"LEPTON_NET_HOTS": "x"})
    assert info.value.key == "LEPTON_NET_HOTS"
    # Variables of other programs share the prefix: not a section here, not an error.
    assert load(Schema, env={"LEPTON_MQTT_HOST": "x", "LEPTON_CONFIG": "/x"}) == Schema()
    with pytest.raises(ConfigError, match=r"unknown key net\.nope \(flag --net-nope\)"):
        load(Schema, overrides={"net.nope": 1}, override_label=lambda k: f"flag {flag_name(k)}")


@pytest.mark.parametrize(
    ("env", "key", "message"),
    [
        ({"LEPTON_NET_PORT": "abc"}, "net.port", "must be an integer"),
        ({"LEPTON_NET_PORT": "0"}, "net.port", "must be an integer >= 1"),
        ({"LEPTON_NET_PORT": "70000"}, "net.port", "must be an integer <= 65535"),
        ({"LEPTON_NET_TLS": "maybe"}, "net.tls", "must be true or false"),
        ({"LEPTON_NET_MODE": "slow"}, "net.mode", "must be one of fast, safe"),
        ({"LEPTON_NET_TIMEOUT_S": "0"}, "net.timeout_s", "must be a number > 0"),
    ],
)
def test_errors_name_the_key_the_value_and_the_variable(
    env: dict[str, str], key: str, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load(Schema, env=env)
    (var,) = env
    assert info.value.key == key
    assert info.value.source == f"env {var}"
    assert str(info.value).startswith(f"{key}: {message}")
    assert f"from env {var}" in str(info.value)


def test_a_cross_key_rule_names_where_its_key_came_from(tmp_path: Path) -> None:
    path = write(tmp_path, "[limits]\nlow = 5\nhigh = 9\n")
    with pytest.raises(ConfigError, match=r"limits\.high must be >= limits\.low") as info:
        load(Schema, file=path, env={"LEPTON_LIMITS_HIGH": "1"})
    assert info.value.source == "env LEPTON_LIMITS_HIGH"
    assert "(from env LEPTON_LIMITS_HIGH)" in str(info.value)


def test_overrides_name_their_flag() -> None:
    with pytest.raises(ConfigError, match=r"flag --net-port") as info:
        load(
            Schema,
            overrides={"net.port": "-1"},
            override_label=lambda key: f"flag {flag_name(key)}",
        )
    assert info.value.source == "flag --net-port"


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load(Schema, file=tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="invalid TOML") as info:
        load(Schema, file=write(tmp_path, "[net\n"))
    assert info.value.source == str(tmp_path / "c.toml")


def test_parsed_data_is_a_layer_with_its_own_name() -> None:
    cfg = load(Schema, data={"net": {"port": 99}, "limits": None}, data_source="job")
    assert (cfg.net.port, cfg.limits) == (99, None)
    with pytest.raises(ConfigError, match=r"from job\)"):
        load(Schema, data={"net": {"port": True}}, data_source="job")


def test_names_and_the_key_table() -> None:
    assert env_name("net.timeout_s") == "LEPTON_NET_TIMEOUT_S"
    assert flag_name("net.timeout_s") == "--net-timeout-s"
    table = keys(Schema)
    assert list(table)[:3] == ["name", "net.host", "net.port"]
    assert table["limits.low"].required
    assert table["extra"].table
    assert "class" in table


def test_coerce_is_the_one_conversion() -> None:
    assert coerce("k", int, "12") == 12
    assert coerce("k", float, 2) == 2.0
    with pytest.raises(ConfigError, match=r"k: must be an integer \(got '12', from the file\)"):
        coerce("k", int, "12", "the file", text=False)
    with pytest.raises(ConfigError, match="must be an integer"):
        coerce("k", int, True)
    assert issubclass(ConfigError, LeptonError)
