"""The layering contracts in pyproject.toml (`lint-imports`, run by scripts/test) hold on
this tree, and break on a copy of it that crosses a layer."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("protocol", "agent", "coordinator", "models")
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
    for name in PACKAGES:
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", dest / "pyproject.toml")
    return dest


def test_the_tree_keeps_every_contract() -> None:
    out = lint(REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("protocol/codec.py", "import agent.config", "the protocol imports neither side"),
        (
            "agent/outbox.py",
            "from coordinator.store import Store",
            "the agent and the coordinator never import each other",
        ),
        ("models/data.py", "import coordinator.config", "models depends on nothing above it"),
        ("agent/fetch.py", "import sqlalchemy", "the agent installs without the coordinator"),
        (
            "coordinator/federated/kernels.py",
            "from coordinator.store import Store",
            "scheduling and aggregation kernels do no I/O",
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
    broken = [ln for ln in out.stdout.splitlines() if ln.endswith("BROKEN")]
    # One crossing can break more than its own contract (protocol -> agent also joins the
    # coordinator to the agent through the protocol); its own must be among them.
    assert any(ln.startswith(contract) for ln in broken), out.stdout
