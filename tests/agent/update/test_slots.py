"""The slot state machine (``lepton-slot``): trials, commits, rollbacks, repair, and a kill
at every step of every transition followed by a boot."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from lepton.agent.update import slots
from tests.agent.update.slotkit import (
    assert_bootable,
    lepton_slot,
    make_root,
    run_driver,
    running,
    state,
)

NOW = 1_800_000_000.0


def test_provisioned_root_boots_committed(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    done = lepton_slot(root, "boot")
    assert done.returncode == 0, done.stderr
    assert running(root) == "0.9.0"
    assert state(root)["committed"] == {"slot": "a", "version": "0.9.0"}


def test_trial_commit_makes_old_previous_and_raises_floor(tmp_path: Path) -> None:
    root = make_root(tmp_path, b="1.0.0")
    slots.begin_trial(root, slot="b", version="1.0.0", deadline=NOW + 60, task_id="t1",
                      kind="install")  # fmt: skip
    assert running(root) == "1.0.0"
    slots.boot(root, now=NOW)
    assert state(root)["trial"]["boots"] == 1
    assert not slots.commit(root, version="1.0.1", slot="b")  # not the trial's version
    assert slots.commit(root, version="1.0.0", slot="b", floor="0.9.5")
    s = state(root)
    assert s["committed"] == {"slot": "b", "version": "1.0.0"}
    assert s["previous"] == {"slot": "a", "version": "0.9.0"}
    assert s["floor"] == "0.9.5"
    assert (s["last"]["outcome"], s["last"]["task_id"]) == ("committed", "t1")
    assert s["trial"] is None
    # The floor is never lowered by a later commit.
    slots.begin_trial(root, slot="a", version="0.9.0", deadline=NOW + 60, task_id=None,
                      kind="revert")  # fmt: skip
    assert slots.commit(root, version="0.9.0", slot="a", floor="0.1.0")
    assert state(root)["floor"] == "0.9.5"
    assert state(root)["last"]["outcome"] == "reverted"


def test_crash_loop_rolls_back_after_max_boots(tmp_path: Path) -> None:
    root = make_root(tmp_path, b="1.0.0")
    slots.begin_trial(root, slot="b", version="1.0.0", deadline=NOW + 600, task_id="t",
                      kind="install")  # fmt: skip
    for boots in range(1, slots.MAX_BOOTS + 1):
        slots.boot(root, now=NOW)
        assert state(root)["trial"]["boots"] == boots
        assert running(root) == "1.0.0"
    slots.boot(root, now=NOW)
    s = state(root)
    assert s["trial"] is None
    assert (s["last"]["outcome"], s["last"]["reason"]) == ("rolled_back", "crash_loop")
    assert running(root) == "0.9.0"


def test_deadline_rolls_back_at_boot_and_by_timer(tmp_path: Path) -> None:
    root = make_root(tmp_path, b="1.0.0")
    slots.begin_trial(root, slot="b", version="1.0.0", deadline=NOW, task_id=None,
                      kind="install")  # fmt: skip
    assert not slots.check(root, now=NOW - 1)
    assert slots.check(root, now=NOW + 1)
    assert state(root)["last"]["reason"] == "health_deadline"
    assert running(root) == "0.9.0"
    slots.begin_trial(root, slot="b", version="1.0.0", deadline=NOW, task_id=None,
                      kind="install")  # fmt: skip
    slots.boot(root, now=NOW + 1)
    assert state(root)["last"]["reason"] == "health_deadline"
    assert running(root) == "0.9.0"


@pytest.mark.parametrize("damage", ["missing", "dangling", "elsewhere"])
def test_boot_repairs_current(tmp_path: Path, damage: str) -> None:
    root = make_root(tmp_path, b="1.0.0")
    (root / "current").unlink()
    if damage == "dangling":
        os.symlink("slots/c", root / "current")
    elif damage == "elsewhere":
        os.symlink("slots/b", root / "current")  # no trial: b is not committed
    done = lepton_slot(root, "boot")
    assert done.returncode == 0, done.stderr
    assert running(root) == "0.9.0"


def test_interrupted_install_is_reported(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    s = slots.read_state(root)
    s["installing"] = {"slot": "b", "version": "1.0.0", "task_id": "t9", "pid": 2**22 + 7,
                       "at": NOW}  # fmt: skip
    slots.write_state(root, s)
    slots.boot(root, now=NOW)
    last = state(root)["last"]
    assert (last["outcome"], last["reason"], last["task_id"]) == (
        "install_failed",
        "interrupted",
        "t9",
    )
    assert state(root)["installing"] is None


# ------------------------------------------------------------------ kill at each step

BEGIN = "m.begin_trial(root, slot='b', version='1.0.0', deadline=9e9, task_id='t', kind='install')"
#: (transition, code, setup, crash points) — the setup puts the root in the transition's
#: starting state; the code is run in a process killed at the point.
SCENARIOS: list[tuple[str, str, str, list[str]]] = [
    (
        "begin_trial",
        BEGIN,
        "",
        [
            "state.tmp_written",
            "state.renamed",
            "trial.written",
            "switch.link_made",
            "switch.replaced",
            "trial.switched",
        ],
    ),
    (
        "rollback_crash_loop",
        "m.boot(root)",
        BEGIN + "\nfor _ in range(3): m.boot(root)",
        [
            "state.tmp_written#1",
            "state.renamed#1",
            "boot.counted",
            "state.tmp_written#2",
            "state.renamed#2",
            "rollback.state_written",
            "switch.link_made",
            "switch.replaced",
            "rollback.switched",
        ],
    ),
    (
        "rollback_deadline_timer",
        "m.check(root, now=1e10)",
        BEGIN + "\nm.boot(root)",
        [
            "state.tmp_written",
            "state.renamed",
            "rollback.state_written",
            "switch.link_made",
            "switch.replaced",
            "rollback.switched",
        ],
    ),
    (
        "commit",
        "assert m.commit(root, version='1.0.0', slot='b', floor='1.0.0')",
        BEGIN + "\nm.boot(root)",
        ["commit.before", "state.tmp_written", "state.renamed", "commit.written"],
    ),
    (
        "repair_current",
        "m.boot(root)",
        "(root / 'current').unlink(); m.os.symlink('slots/zz', root / 'current')",
        ["switch.link_made", "switch.replaced"],
    ),
]
CASES = [(name, code, setup, point) for name, code, setup, points in SCENARIOS for point in points]
#: How many (transition, step) kills this file covers (see the report in the module list).
KILL_CASES = len(CASES)


@pytest.mark.parametrize(("name", "code", "setup", "point"), CASES,
                         ids=[f"{c[0]}@{c[3]}" for c in CASES])  # fmt: skip
def test_kill_at_step_then_boot(tmp_path: Path, name: str, code: str, setup: str,
                                point: str) -> None:  # fmt: skip
    root = make_root(tmp_path, b="1.0.0")
    if setup:
        done = run_driver(root, setup, crash_at=None)
        assert done.returncode == 0, done.stderr
    done = run_driver(root, code, crash_at=point)
    assert done.returncode == -9, f"{point} not reached: {done.returncode} {done.stderr}"
    boot = lepton_slot(root, "boot")
    assert boot.returncode == 0, boot.stderr
    assert_bootable(root)
    s = state(root)
    if s["trial"]:
        # The trial is still bounded: past its deadline it is rolled back to a committed one.
        assert lepton_slot(root, "check", "--restart-command", "").returncode == 0
        s["trial"]["deadline"] = time.time() - 1
        slots.write_state(root, s)
        lepton_slot(root, "check", "--restart-command", "")
        assert_bootable(root)
        assert state(root)["trial"] is None
    assert running(root) == state(root)["committed"]["version"]
