"""The layering contracts in pyproject.toml (`lint-imports`, run by scripts/test) hold on
this tree, and break on a copy of it that crosses a layer."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OLD_TOP_LEVEL = {"protocol", "agent", "coordinator", "models"}
LINT = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed")


def lint(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT), "--no-cache", "--config", str(root / "pyproject.toml")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def copy_tree(dest: Path) -> Path:
    shutil.copytree(REPO / "lepton", dest / "lepton", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", dest / "pyproject.toml")
    return dest


def test_the_tree_keeps_every_contract() -> None:
    out = lint(REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        (
            "lepton/common/settings.py",
            "import lepton.protocol.topics",
            "common is pure",
        ),
        (  # release verification may read lepton.protocol.releases, and nothing else of it
            "lepton/common/signing.py",
            "import lepton.protocol.topics",
            "common is pure",
        ),
        (
            "lepton/protocol/codec.py",
            "import lepton.agent.config",
            "the protocol imports only common",
        ),
        (
            "lepton/agent/outbox.py",
            "from lepton.coordinator.store import Store",
            "the agent and the coordinator never import each other",
        ),
        (
            "lepton/models/data.py",
            "import lepton.coordinator.config",
            "models depends on nothing above it",
        ),
        (
            "lepton/agent/fetch.py",
            "import sqlalchemy",
            "the agent installs without the coordinator",
        ),
        (
            "lepton/coordinator/fl/kernels/aggregate.py",
            "from lepton.coordinator.store import Store",
            "scheduling and aggregation kernels do no I/O",
        ),
        (
            "lepton/coordinator/service.py",
            "import lepton.demo.stack",
            "the agent and the coordinator never import the demo or the simulator",
        ),
        (
            "lepton/agent/daemon.py",
            "from lepton.sim.profiles import Profile",
            "the agent and the coordinator never import the demo or the simulator",
        ),
        (
            "lepton/sim/fleet.py",
            "import lepton.coordinator.config",
            "the simulator drives real agents and never imports the coordinator",
        ),
    ],
)
def test_a_crossed_layer_breaks_its_contract(
    tmp_path: Path, module: str, line: str, contract: str
) -> None:
    root = copy_tree(tmp_path)
    target = root / module
    # Deferred, as the code base imports heavy modules: the contracts see those too.
    target.write_text(target.read_text() + f"\n\ndef _crossing() -> None:\n    {line}\n")
    out = lint(root)
    assert out.returncode != 0
    # "<name> BROKEN", or "<name> BROKEN (N ignored imports)" for a contract with exceptions.
    broken = [ln for ln in out.stdout.splitlines() if " BROKEN" in ln]
    # One crossing can break more than its own contract (protocol -> agent also joins the
    # coordinator to the agent through the protocol); its own must be among them.
    assert any(ln.startswith(contract) for ln in broken), out.stdout


def test_nothing_imports_the_old_top_level_names() -> None:
    """Everything lives under one namespace; an import of a bare `agent`, `coordinator`,
    `protocol` or `models` would load a second copy of a module from the source tree."""
    tracked = subprocess.run(
        ["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    offenders = []
    for name in tracked:
        tree = ast.parse((REPO / name).read_text(), filename=name)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                tops = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops = [node.module.split(".")[0]]
            else:
                continue
            offenders += [f"{name}:{node.lineno} {t}" for t in tops if t in OLD_TOP_LEVEL]
    assert not offenders, offenders
