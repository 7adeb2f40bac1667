"""Named data sources and their configuration."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from lepton.agent.config import load_config
from lepton.agent.training.datasources import (
    ArraySource,
    DataSourceError,
    DataSources,
    ImageFolderSource,
    NpySource,
    NpzSource,
    PluginSource,
    source_for,
)
from lepton.common.errors import ConfigError

PLUGIN = "tests.agent.training.plugin_data"


def test_npz_with_and_without_labels(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(10, 3)).astype(np.float32)
    y = np.arange(10) % 3
    np.savez(tmp_path / "d.npz", x=x, y=y)
    np.savez(tmp_path / "u.npz", x=x)
    data = source_for(str(tmp_path / "d.npz")).load()
    np.testing.assert_array_equal(data.x, x)
    assert data.y is not None
    np.testing.assert_array_equal(data.y, y)
    assert len(source_for(str(tmp_path / "d.npz")).load(limit=4)) == 4
    assert source_for(str(tmp_path / "u.npz")).load().y is None


def test_npz_problems_are_clear(tmp_path: Path) -> None:
    np.savez(tmp_path / "nox.npz", data=np.zeros(3))
    with pytest.raises(DataSourceError, match="no array named 'x'"):
        NpzSource(tmp_path / "nox.npz").load()
    np.savez(tmp_path / "bad.npz", x=np.zeros((4, 2)), y=np.zeros(3))
    with pytest.raises(DataSourceError, match="4 samples but 3 labels"):
        NpzSource(tmp_path / "bad.npz").load()
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataSourceError, match="cannot read"):  # never unpickled
        NpzSource(tmp_path / "obj.npz").load()
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataSourceError, match="cannot read"):
        NpzSource(tmp_path / "junk.npz").load()


def test_npy_is_x_only(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.ones((5, 2), dtype=np.float32))
    data = NpySource(tmp_path / "x.npy").load(limit=2)
    assert data.x.shape == (2, 2)
    assert data.y is None


def test_plugins() -> None:
    data = source_for(f"{PLUGIN}:pairs").load(limit=4)
    assert data.x.shape == (4, 2)
    assert data.y is not None
    assert data.y.tolist() == [0, 1, 0, 1]
    assert source_for(f"{PLUGIN}:only_x").load().y is None
    with pytest.raises(DataSourceError, match="sensor offline"):
        PluginSource(f"{PLUGIN}:broken").load()
    with pytest.raises(DataSourceError, match="3 samples but 2 labels"):
        PluginSource(f"{PLUGIN}:mismatched").load()
    with pytest.raises(DataSourceError, match="is not callable"):
        PluginSource(f"{PLUGIN}:NOT_CALLABLE").load()
    with pytest.raises(DataSourceError, match="cannot import"):
        PluginSource("no_such_module_here:load").load()


def test_plugin_returning_a_map_style_dataset() -> None:
    pytest.importorskip("torch")
    data = source_for(f"{PLUGIN}:torch_dataset").load(limit=7)
    assert data.x.shape == (7, 1, 2, 2)
    assert data.x.dtype == np.float32
    assert data.y is not None
    assert data.y.tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert data.x[3].ravel().tolist() == [12.0, 13.0, 14.0, 15.0]
    plain = source_for(f"{PLUGIN}:samples").load()
    assert plain.x.shape == (5, 3)
    assert plain.y is not None
    assert plain.y.tolist() == [0, 1, 0, 1, 0]
    with pytest.raises(DataSourceError, match=r"item 1 has shape \(4,\)"):
        source_for(f"{PLUGIN}:ragged_samples").load()
    with pytest.raises(DataSourceError, match=r"item 0 is not an \(x, y\) pair"):
        source_for(f"{PLUGIN}:not_pairs").load()


def test_unknown_and_unsupported_specs(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match="does not exist"):
        source_for(str(tmp_path / "missing.npz").replace(".npz", ".csv"))
    (tmp_path / "data.csv").write_text("1,2\n")
    with pytest.raises(DataSourceError, match=r"expected \.npz"):
        source_for(str(tmp_path / "data.csv"))
    sources = DataSources({"a": str(tmp_path / "a.npz")})
    sources.add("mem", ArraySource(np.zeros((2, 2))))
    assert sources.names() == ["a", "mem"]
    with pytest.raises(DataSourceError, match=r"unknown data source 'b' \(known: a, mem\)"):
        sources.get("b")


def test_image_folder_without_pillow_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "a.png").write_bytes(b"\x89PNG")
    monkeypatch.setitem(sys.modules, "PIL", None)
    assert isinstance(source_for(str(tmp_path)), ImageFolderSource)
    with pytest.raises(DataSourceError, match="need Pillow"):
        source_for(str(tmp_path)).load()


def test_image_folder_with_class_subfolders(tmp_path: Path) -> None:
    image_mod = pytest.importorskip("PIL.Image", reason="Pillow is not installed")
    for label, name in enumerate(["cat", "dog"]):
        (tmp_path / name).mkdir()
        for i in range(3):
            pixels = np.full((4, 5), 10 * label + i, dtype=np.uint8)
            image_mod.fromarray(pixels).save(tmp_path / name / f"{i}.png")
    data = source_for(str(tmp_path)).load()
    assert data.x.shape == (6, 4, 5)
    assert data.classes == ("cat", "dog")
    assert data.y is not None
    assert data.y.tolist() == [0, 0, 0, 1, 1, 1]


# ---------------------------------------------------------------- sizes


def test_sources_remember_full_sizes_of_what_tasks_loaded(tmp_path: Path) -> None:
    """A capacity report carries these sizes; a federated round bounds a device's claimed
    example count by them (finding 4 of the hardening review), so a load that a task's
    limit cut short still records the whole source, and an unprovable size is not made up."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(30, 3)), y=np.arange(30) % 3)
    np.save(tmp_path / "x.npy", np.ones((12, 2), dtype=np.float32))
    sources = DataSources(
        {
            "npz": str(tmp_path / "d.npz"),
            "npy": str(tmp_path / "x.npy"),
            "map": f"{PLUGIN}:samples",
            "arrays": f"{PLUGIN}:pairs",
            "short": f"{PLUGIN}:short_labels",
        }
    )
    assert sources.sizes() == {}  # nothing is read before a task asks
    assert len(sources.load("npz", limit=4)) == 4
    assert len(sources.load("npy", limit=5)) == 5
    assert len(sources.load("map", limit=2)) == 2
    assert len(sources.load("arrays")) == 6
    assert len(sources.load("short", limit=3)) == 3
    assert sources.sizes() == {"npz": 30, "npy": 12, "map": 5, "arrays": 6}
    # A source that no longer loads has no known size.
    (tmp_path / "d.npz").write_bytes(b"not a zip")
    with pytest.raises(DataSourceError, match="cannot read"):
        sources.load("npz")
    assert "npz" not in sources.sizes()
    # Another source under a known name: its size is unknown until it is loaded.
    sources.add("arrays", ArraySource(np.zeros((3, 2)), np.zeros(3)))
    assert "arrays" not in sources.sizes()
    sources.load("arrays", limit=100)
    assert sources.sizes()["arrays"] == 3


def test_an_image_folder_counts_its_files_when_cut(tmp_path: Path) -> None:
    image_mod = pytest.importorskip("PIL.Image", reason="Pillow is not installed")
    (tmp_path / "cat").mkdir()
    for i in range(4):
        image_mod.fromarray(np.full((2, 2), i, dtype=np.uint8)).save(tmp_path / "cat" / f"{i}.png")
    sources = DataSources({"img": str(tmp_path)})
    assert len(sources.load("img", limit=1)) == 1
    assert sources.sizes() == {"img": 4}


# ---------------------------------------------------------------- configuration


def test_data_table_env_and_flags(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        '[data]\ndigits = "/srv/digits.npz"\ncam = "plugins.cam:frames"\n'
        "[endpoint]\nport = 8780\n"
        '[inference]\nthreads = 2\nproviders = ["cuda", "cpu"]\nallow_spinning = true\n'
    )
    config = load_config(
        cfg, env={"LEPTON_DATA_DIGITS": "/data/digits.npz", "LEPTON_DATA_EXTRA": "/x.npy"}
    )
    assert config.data == {
        "cam": "plugins.cam:frames",
        "digits": "/data/digits.npz",  # the environment beats the file, entry by entry
        "extra": "/x.npy",
    }
    assert config.endpoint.port == 8780
    assert config.endpoint.enabled
    assert config.inference.threads == 2
    assert config.inference.providers == ("cuda", "cpu")
    assert config.inference.allow_spinning
    assert not load_config(None, env={}).inference.allow_spinning
    env = {"LEPTON_INFERENCE_ALLOW_SPINNING": "false"}
    assert not load_config(cfg, env=env).inference.allow_spinning
    flags = load_config(cfg, env={}, overrides={"data": "a=/a.npz,b=m:f"})
    assert flags.data == {"a": "/a.npz", "b": "m:f"}
    assert not load_config(None, env={}).endpoint.enabled


@pytest.mark.parametrize(
    ("text", "env", "match"),
    [
        ("[data]\ndigits = 3\n", {}, r"data\.digits: must be a string"),
        ('[data]\n"bad name" = "/x"\n', {}, "data source name"),
        ("[endpoint]\nprot = 1\n", {}, r"unknown key endpoint\.prot"),
        ("[inference]\nthreads = -1\n", {}, r"inference\.threads: must be an integer >= 0"),
        ("[endpoint]\nport = 70000\n", {}, "endpoint.port"),
        ("", {"LEPTON_ENDPOINT_PROT": "1"}, "LEPTON_ENDPOINT_PROT"),
        ("", {"LEPTON_DATA_BAD!": "/x"}, "data source name"),
    ],
)
def test_bad_inference_config_is_named(
    tmp_path: Path, text: str, env: dict[str, str], match: str
) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(cfg, env=env)
