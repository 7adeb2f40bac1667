"""Allowed fetch origins: parsing, matching and the config keys (Finding 7 of the hardening
review)."""

from __future__ import annotations

import pytest

from lepton.agent.config import load_config
from lepton.agent.origins import OriginError, Origins, origin_of
from lepton.common.errors import ConfigError


@pytest.mark.parametrize(
    ("url", "origin"),
    [
        ("http://Coord.example/blobs/x", "http://coord.example:80"),
        ("https://coord.example/blobs/x", "https://coord.example:443"),
        ("https://coord.example:8443/a?b#c", "https://coord.example:8443"),
        ("http://[::1]:8080/x", "http://[::1]:8080"),
    ],
)
def test_origin_of(url: str, origin: str) -> None:
    assert origin_of(url) == origin


@pytest.mark.parametrize(
    "url", ["ftp://x/y", "file:///etc/passwd", "http://", "http://a:99999/", "http://u:p@h/x"]
)
def test_malformed_urls_have_no_origin(url: str) -> None:
    with pytest.raises(OriginError):
        origin_of(url)


def test_only_the_coordinator_and_configured_origins_are_permitted() -> None:
    origins = Origins.from_config("https://coord.example", ["http://mirror.lan:8000"])
    assert origins.permits("https://coord.example/blobs/abc")
    assert origins.permits("https://COORD.example:443/blobs/abc")
    assert origins.permits("http://mirror.lan:8000/x")
    for url in (
        "http://coord.example/blobs/abc",  # another scheme is another origin
        "https://coord.example:8443/blobs/abc",
        "https://coord.example.evil.net/x",
        "https://evil.net/?https://coord.example/",
        "https://coord.example@evil.net/x",
        "http://169.254.169.254/latest/meta-data",
        "http://mirror.lan/x",
        "not a url",
    ):
        assert not origins.permits(url), url


def test_any_port_entries_and_an_empty_list() -> None:
    local = Origins.from_config(None, ["http://127.0.0.1:*"])
    assert local.permits("http://127.0.0.1:1234/x")
    assert not local.permits("https://127.0.0.1:1234/x")
    assert not local.permits("http://127.0.0.2:1234/x")
    assert not Origins().permits("http://127.0.0.1/x")


def test_config_keys() -> None:
    cfg = load_config(
        None,
        env={"LEPTON_FETCH_ORIGINS": "http://mirror.lan:8000"},
        overrides={"fetch.coordinator_url": "https://coord.example/api"},
    )
    assert cfg.origins.allowed == ("https://coord.example:443", "http://mirror.lan:8000")
    assert load_config(None, env={}).origins.allowed == ()
    with pytest.raises(ConfigError, match="fetch"):
        load_config(None, env={"LEPTON_FETCH_ORIGINS": "ftp://mirror.lan"})
