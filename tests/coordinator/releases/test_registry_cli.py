"""``lepton release publish|ls|show`` against a running coordinator: a bundle published from
the command line is listed and shown; a refused one exits 1 with its reason."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from lepton.coordinator.cli import main
from lepton.coordinator.service import Coordinator
from tests.coordinator.conftest import cli_token
from tests.support.release_bundles import Trust, bundle


async def lepton(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def test_publish_ls_and_show_from_the_command_line(
    releasing: Coordinator,
    trust: Trust,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cli_token(monkeypatch, releasing, ("rollouts:write", "fleet:read"))
    api = str(releasing.api_url)
    path, m, _ = bundle(tmp_path / "b.tar", trust, {"a.whl": b"a", "b.whl": b"bb"})
    code, out, err = await lepton(capsys, "--api", api, "release", "publish", str(path))
    assert code == 0, err
    assert "lepton-agent 1.1.0 (agent, rpi5): manifest " in out
    code, out, _ = await lepton(capsys, "--api", api, "--json", "release", "ls")
    (listed,) = json.loads(out)["releases"]
    assert (listed["name"], listed["version"], listed["file_count"]) == ("lepton-agent", "1.1.0", 2)
    code, out, _ = await lepton(capsys, "--api", api, "release", "show", "lepton-agent", "1.1.0")
    assert code == 0
    for f in m.files:
        assert f.sha256 in out
    code, _, err = await lepton(capsys, "--api", api, "release", "show", "lepton-agent", "9.0.0")
    assert code == 3
    forged, _, _ = bundle(tmp_path / "f.tar", trust, {"a.whl": b"a"}, key=Trust().release_key)
    code, _, err = await lepton(capsys, "--api", api, "release", "publish", str(forged))
    assert code == 1
    assert "unknown_key" in err
