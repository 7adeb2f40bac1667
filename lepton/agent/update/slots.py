"""The A/B slot state machine of an agent image root, and the ``lepton-slot`` command.

STANDARD LIBRARY ONLY: this file is copied to ``<root>/bin/lepton-slot`` and run by the
system's ``/usr/bin/python3`` as root before the agent starts (``ExecStartPre=+``), so it must
work when the current slot's virtual environment is broken. It imports nothing from lepton.

Layout under ``<root>`` (default ``/opt/lepton``)::

    slots/a/ slots/b/   venv/, bundle/ (verified files), manifest.dsse.json
    current -> slots/a  a symlink, switched atomically (a new link renamed over it)
    boot.json           the state below, written atomically (tmp, fsync, rename, fsync dir)

``boot.json`` (format 1)::

    {"format": 1,
     "committed": {"slot": "a", "version": "0.9.0"} | null,
     "previous":  {"slot": "b", "version": "0.8.0"} | null,   # the other slot, for revert
     "floor": "0.9.0",
     "trial": {"slot", "version", "deadline" (unix s), "boots", "max_boots", "task_id",
               "kind": "install" | "revert"} | null,
     "installing": {"slot", "version", "task_id", "pid", "at"} | null,
     "last": {"outcome", "target", "reason", "at", "task_id"}}

Invariants, restored by :func:`repair` on every ``boot`` (so a kill at any point leaves a
device that boots a committed version):

* no trial: ``current`` points at the committed slot;
* a trial: ``current`` points at the trial's slot, else the switch (or a rollback) was cut
  short and the trial is rolled back (reason ``interrupted``);
* ``previous`` never names a slot being written: an installer clears it (one atomic write)
  before it touches the inactive slot, and marks the slot ``installing``; a marker whose
  process is gone is an interrupted install (``install_failed``).

Order of writes: a trial is written to ``boot.json`` before ``current`` is switched to it;
a rollback writes ``boot.json`` first and switches after; a commit is one write. Each of
these, cut at any point, is brought back to the invariants above by :func:`repair`.

Fault injection for tests: ``LEPTON_SLOT_CRASH_AT=<step>`` (or ``<step>#<n>`` for its
n-th occurrence) makes the process SIGKILL itself at that step (see :data:`CRASH_POINTS`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

FORMAT = 1
SLOTS = ("a", "b")
MAX_BOOTS = 3
STATE_FILE = "boot.json"
CURRENT = "current"
CRASH_ENV = "LEPTON_SLOT_CRASH_AT"
DEFAULT_ROOT = "/opt/lepton"
DEFAULT_STATE_DIR = "/var/lib/lepton"
DEFAULT_RESTART = "systemctl restart --no-block lepton-agent.service"

#: Every step a test may kill the process at (slots.py and installer.py together).
CRASH_POINTS = (
    "state.tmp_written",  # boot.json.tmp written and synced, not yet renamed
    "state.renamed",  # renamed, directory not yet synced
    "switch.link_made",  # the new symlink exists beside ``current``
    "switch.replaced",  # ``current`` replaced
    "boot.counted",  # a trial's boot counted
    "rollback.state_written",  # rollback recorded, ``current`` not yet switched back
    "rollback.switched",
    "commit.before",
    "commit.written",
    "install.marked",  # installing marker written, slot untouched
    "install.slot_cleared",
    "install.files_copied",
    "install.venv_built",
    "install.smoked",
    "trial.written",  # trial in boot.json, ``current`` not switched
    "trial.switched",  # switched, agent not restarted
)

_seen: dict[str, int] = {}


def crash_point(step: str) -> None:
    """SIGKILL this process here if ``$LEPTON_SLOT_CRASH_AT`` names ``step`` (tests)."""
    wanted = os.environ.get(CRASH_ENV)
    if not wanted:
        return
    name, _, nth = wanted.partition("#")
    if name != step:
        return
    _seen[step] = _seen.get(step, 0) + 1
    if _seen[step] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def version_tuple(text: str) -> tuple[int, ...]:
    """``"1.4.0"`` as ``(1, 4, 0)`` (``()`` for an empty or malformed text: lowest of all)."""
    try:
        return tuple(int(p) for p in text.split("."))
    except ValueError:
        return ()


# ---------------------------------------------------------------- state file


def empty_state() -> dict[str, Any]:
    return {
        "format": FORMAT,
        "committed": None,
        "previous": None,
        "floor": "0.0.0",
        "trial": None,
        "installing": None,
        "last": {"outcome": "none", "target": "", "reason": "", "at": 0.0, "task_id": None},
    }


def read_state(root: Path) -> dict[str, Any]:
    """The state in ``<root>/boot.json`` (an empty state when there is none)."""
    try:
        data = json.loads((root / STATE_FILE).read_text())
    except FileNotFoundError:
        return empty_state()
    state = empty_state()
    if isinstance(data, dict):
        state.update({k: v for k, v in data.items() if k in state})
    return state


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_state(root: Path, state: dict[str, Any]) -> None:
    """Replace ``boot.json`` atomically: a reader (or a reboot) sees the old or the new one."""
    tmp = root / (STATE_FILE + ".tmp")
    data = json.dumps(state, indent=1, sort_keys=True).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    crash_point("state.tmp_written")
    os.replace(tmp, root / STATE_FILE)
    crash_point("state.renamed")
    _fsync_dir(root)


def _record(state: dict[str, Any], outcome: str, target: str, reason: str, task: Any) -> None:
    state["last"] = {
        "outcome": outcome,
        "target": target,
        "reason": reason[:200],
        "at": time.time(),
        "task_id": task,
    }


# ---------------------------------------------------------------- current


def current_slot(root: Path) -> str | None:
    """The slot ``current`` points at, or None (missing, dangling, or not a slot)."""
    link = root / CURRENT
    try:
        target = os.readlink(link)
    except OSError:
        return None
    name = Path(target).name
    if Path(target).parent.name != "slots" or name not in SLOTS:
        return None
    return name if (root / "slots" / name).is_dir() else None


def switch(root: Path, slot: str) -> None:
    """Point ``current`` at ``slots/<slot>`` atomically (a new link renamed over the old)."""
    if slot not in SLOTS:
        raise ValueError(f"not a slot: {slot!r}")
    tmp = root / (CURRENT + ".new")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(f"slots/{slot}", tmp)
    crash_point("switch.link_made")
    os.replace(tmp, root / CURRENT)
    crash_point("switch.replaced")
    _fsync_dir(root)


def other(slot: str) -> str:
    return "b" if slot == "a" else "a"


# ---------------------------------------------------------------- transitions


def _pid_alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def repair(root: Path, state: dict[str, Any], *, now: float) -> list[str]:
    """Restore the invariants (module docstring); returns what was done."""
    done: list[str] = []
    inst = state.get("installing")
    if inst and not _pid_alive(inst.get("pid")):
        state["installing"] = None
        _record(
            state, "install_failed", inst.get("version", ""), "interrupted", inst.get("task_id")
        )
        write_state(root, state)
        done.append("install_interrupted")
    trial = state.get("trial")
    if trial and current_slot(root) != trial["slot"]:
        rollback(root, state, "interrupted")
        done.append("trial_interrupted")
    committed = state.get("committed")
    if not state.get("trial") and committed and current_slot(root) != committed["slot"]:
        switch(root, committed["slot"])
        done.append("current_repaired")
    return done


def rollback(root: Path, state: dict[str, Any], reason: str) -> None:
    """End the trial: record ``rolled_back`` first, then point ``current`` back."""
    trial = state["trial"]
    state["trial"] = None
    outcome = "rolled_back"
    _record(state, outcome, trial["version"], reason, trial.get("task_id"))
    write_state(root, state)
    crash_point("rollback.state_written")
    committed = state.get("committed")
    if committed:
        switch(root, committed["slot"])
    crash_point("rollback.switched")


def boot(root: Path, *, now: float | None = None) -> dict[str, Any]:
    """Before each agent start: count a trial's boot, roll back a crash loop or a trial past
    its deadline, and repair ``current``. Returns the state it leaves."""
    now = time.time() if now is None else now
    state = read_state(root)
    repair(root, state, now=now)
    trial = state.get("trial")
    if trial:
        trial["boots"] = int(trial.get("boots", 0)) + 1
        write_state(root, state)
        crash_point("boot.counted")
        if trial["boots"] > int(trial.get("max_boots", MAX_BOOTS)):
            rollback(root, state, "crash_loop")
        elif now > float(trial["deadline"]):
            rollback(root, state, "health_deadline")
    return state


def check(root: Path, *, now: float | None = None, restart: str | None = None) -> bool:
    """The timer's deadline check: roll back a trial past its deadline (then restart the
    agent with ``restart``). True when it rolled back."""
    now = time.time() if now is None else now
    state = read_state(root)
    trial = state.get("trial")
    if not trial or now <= float(trial["deadline"]):
        return False
    rollback(root, state, "health_deadline")
    if restart:
        subprocess.run(restart.split(), check=False, timeout=60)
    return True


def begin_trial(
    root: Path,
    *,
    slot: str,
    version: str,
    deadline: float,
    task_id: str | None,
    kind: str,
    max_boots: int = MAX_BOOTS,
) -> None:
    """Start a trial of ``slot``: the trial is written, then ``current`` switched to it."""
    state = read_state(root)
    state["installing"] = None
    state["trial"] = {
        "slot": slot,
        "version": version,
        "deadline": float(deadline),
        "boots": 0,
        "max_boots": max_boots,
        "task_id": task_id,
        "kind": kind,
    }
    _record(state, "trial", version, "", task_id)
    write_state(root, state)
    crash_point("trial.written")
    switch(root, slot)
    crash_point("trial.switched")


def slot_floor(root: Path, slot: str) -> str:
    """The ``security_floor`` of the manifest the installer verified into ``slot``."""
    import base64

    try:
        env = json.loads((root / "slots" / slot / "manifest.dsse.json").read_text())
        floor = json.loads(base64.b64decode(env["payload"]))["security_floor"]
    except (OSError, ValueError, KeyError, TypeError):
        return "0.0.0"
    return str(floor) if version_tuple(str(floor)) else "0.0.0"


def commit(root: Path, *, version: str, slot: str, floor: str = "0.0.0") -> bool:
    """A healthy verdict for the trial ``version`` in ``slot``: make it the committed image,
    the old one ``previous``, raise the floor (to ``floor`` or the slot manifest's
    ``security_floor``, whichever is higher; never lowered). False when no such trial runs."""
    state = read_state(root)
    trial = state.get("trial")
    if not trial or trial["slot"] != slot or trial["version"] != version:
        return False
    if current_slot(root) != slot:
        return False
    crash_point("commit.before")
    old = state.get("committed")
    state["previous"] = old if old and old["slot"] != slot else None
    state["committed"] = {"slot": slot, "version": version}
    state["trial"] = None
    floor = max(floor, slot_floor(root, slot), key=version_tuple)
    if version_tuple(floor) > version_tuple(state.get("floor", "0.0.0")):
        state["floor"] = floor
    outcome = "reverted" if trial.get("kind") == "revert" else "committed"
    _record(state, outcome, version, "", trial.get("task_id"))
    write_state(root, state)
    crash_point("commit.written")
    return True


def provision(root: Path, *, slot: str, version: str, floor: str = "0.0.0") -> None:
    """First install (factory or tests): ``slot`` holds ``version``; commit it outright."""
    state = read_state(root)
    state["committed"] = {"slot": slot, "version": version}
    state["previous"] = None
    state["trial"] = None
    state["floor"] = floor
    write_state(root, state)
    switch(root, slot)


# ---------------------------------------------------------------- service (lepton-update)


def _verdict(root: Path, health: Path, restart: str | None) -> str:
    """Commit a healthy trial; roll back an unhealthy one (then restart the agent). A
    verdict that does not name the running trial is ignored (the agent writes it)."""
    try:
        verdict = json.loads(health.read_text())
        version, slot = str(verdict["version"]), str(verdict["slot"])
        healthy = verdict.get("healthy") is True
        reason = str(verdict.get("reason", ""))[:150]
    except (ValueError, KeyError, TypeError, AttributeError):
        return "verdict_ignored"
    if healthy:
        # The floor comes from the slot's verified manifest, never from the verdict.
        return "committed" if commit(root, version=version, slot=slot) else "verdict_ignored"
    state = read_state(root)
    trial = state.get("trial")
    if not trial or trial["slot"] != slot or trial["version"] != version:
        return "verdict_ignored"
    rollback(root, state, f"unhealthy: {reason}")
    if restart:
        subprocess.run(restart.split(), check=False, timeout=60)
    return "rolled_back"


def service(
    root: Path, state_dir: Path, *, python: str | None = None, restart: str | None = None
) -> str:
    """``lepton-update.service``: roll back a trial past its deadline, act on a health
    verdict, then on an install or revert request. Returns what it did (for the log)."""
    update = state_dir / "update"
    did = "rolled_back" if check(root, restart=restart) else "nothing"
    health = update / "health.json"
    if health.exists():
        did = _verdict(root, health, restart)
        health.unlink(missing_ok=True)
    if (update / "request.json").exists():
        exe = python or str(root / CURRENT / "venv" / "bin" / "python")
        # -I: only the slot's own lepton, never a working directory's or $PYTHONPATH's.
        cmd = [exe, "-I", "-m", "lepton.agent.update.installer", "--root", str(root)]
        subprocess.run([*cmd, "--state-dir", str(state_dir)], check=False, timeout=3600)
        did = "installer_ran"
    return did


# ---------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lepton-slot", description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(DEFAULT_ROOT))
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("boot", help="before the agent starts: count, roll back, repair")
    svc = sub.add_parser("service", help="act on health.json / request.json")
    svc.add_argument("--state-dir", type=Path, default=Path(DEFAULT_STATE_DIR))
    svc.add_argument("--restart-command", default=DEFAULT_RESTART)
    chk = sub.add_parser("check", help="roll back a trial past its deadline")
    chk.add_argument("--restart-command", default=DEFAULT_RESTART)
    com = sub.add_parser("commit", help="commit the running trial")
    com.add_argument("--version", required=True)
    com.add_argument("--slot", choices=SLOTS, required=True)
    com.add_argument("--floor", default="0.0.0")
    sub.add_parser("status", help="print boot.json and the current slot")
    sw = sub.add_parser("switch", help="point current at a slot (admin, tests)")
    sw.add_argument("slot", choices=SLOTS)
    ns = parser.parse_args(argv)
    root: Path = ns.root
    if ns.command == "boot":
        state = boot(root)
        print(json.dumps({"current": current_slot(root), "last": state["last"]}))
    elif ns.command == "service":
        print(service(root, ns.state_dir, restart=ns.restart_command or None))
    elif ns.command == "check":
        print("rolled_back" if check(root, restart=ns.restart_command) else "ok")
    elif ns.command == "commit":
        if not commit(root, version=ns.version, slot=ns.slot, floor=ns.floor):
            print("lepton-slot: no such trial running", file=sys.stderr)
            return 1
    elif ns.command == "status":
        print(json.dumps({**read_state(root), "current": current_slot(root)}, indent=1))
    elif ns.command == "switch":
        switch(root, ns.slot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
