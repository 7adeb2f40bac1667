"""A virtual device's A/B updates: the :class:`~lepton.agent.update.updater.Updater` interface
with the install simulated and everything before it real.

What is real: the install task (the agent's own handler) fetches the signed manifest and its
files from the coordinator and checks them against this device's trust root
(``lepton.common.releases``: signatures, keys, expiry, class, kind, rollback, floor, every
file's hash); a refusal is the device's own. What is simulated: building the new slot (no
virtual environment: the device keeps two slots and its state in ``<state>/update/sim.json``),
the restart into it (the virtual device stops its agent and starts a new one, whose birth
message carries the new version and the trial status), and the health trial, which passes
unless :class:`UpdateFail` says this device fails it. A failed trial goes back to the old slot
(outcome ``rolled_back``, reason ``crash_loop``), as a real device's boot counter does; a
``revert`` switches to the other slot when it holds a committed version at or above the floor.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lepton.common.releases import ReleaseRefused, load_root
from lepton.protocol.messages import UpdateStatus
from lepton.protocol.releases import Manifest, Root, parse_version

log = logging.getLogger(__name__)

#: A bundle holding a file of this name (anywhere in it) is a build that crashes on start:
#: every device that installs it fails its trial (the demo's broken release carries one).
CRASH_MARKER = "SIM_CRASHES"
STATE_FILE = "sim.json"
Slot = Literal["a", "b"]


@dataclass(frozen=True, slots=True, kw_only=True)
class UpdateFail:
    """Which devices fail the health trial of which releases.

    ``share`` of the devices (chosen by a hash of device id and version, so the same devices
    fail the same release in every run) fail releases whose version is in ``versions``
    (empty: no version). A bundle carrying :data:`CRASH_MARKER` fails everywhere."""

    share: float = 0.0
    versions: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if not 0.0 <= self.share <= 1.0:
            raise ValueError(f"update_fail share must be in [0, 1], not {self.share}")
        for v in self.versions:
            parse_version(v)

    @classmethod
    def parse(cls, text: str) -> UpdateFail:
        """``"0.2:1.2.0,1.3.0"``: a fifth of the devices fail 1.2.0 and 1.3.0."""
        share, sep, versions = text.partition(":")
        if not sep or not versions:
            raise ValueError(f"update_fail is SHARE:VERSION[,VERSION...], not {text!r}")
        return cls(share=float(share), versions=frozenset(versions.split(",")))

    def fails(self, device_id: str, version: str) -> bool:
        if version not in self.versions or self.share <= 0.0:
            return False
        h = hashlib.sha256(f"{device_id}\0{version}".encode()).digest()
        return int.from_bytes(h[:8], "big") / 2**64 < self.share


@functools.cache
def _root_from(path: Path, mtime_ns: int) -> Root:
    # One parse per process and file version: a thousand devices share one root file.
    return load_root(path.read_bytes(), trusted=None, now=time.time())


def _newer(a: str, b: str) -> str:
    return a if parse_version(a) >= parse_version(b) else b


@dataclass(slots=True)
class _State:
    """What ``sim.json`` holds: the two slots, the running one, the floor, the trial."""

    current: Slot = "a"
    slots: dict[str, dict[str, Any]] = field(default_factory=dict)
    floor: str = "0.0.0"
    status: dict[str, Any] = field(default_factory=dict)
    #: {slot, version, task_id, fails, revert, floor} while a new slot waits to boot or
    #: proves itself; None otherwise.
    pending: dict[str, Any] | None = None


class SimulatedUpdater:
    """Two slots in memory (and a small JSON file), real verification before them.

    ``restart`` is called (with no argument) when the device must restart its agent: after a
    stage or a revert request, and when a trial fails. The virtual device then stops its
    agent (which finishes the running task and sends its result), calls :meth:`boot`, and
    starts a new agent, which reports :meth:`running_version` and :meth:`status` in its
    birth message and runs :meth:`trial`."""

    def __init__(
        self,
        *,
        device_id: str,
        state_dir: Path,
        root_file: Path,
        version: str,
        device_class: str | None = None,
        fail: UpdateFail | None = None,
        trial_s: float = 1.0,
        install_s: float = 0.5,
    ) -> None:
        parse_version(version)
        self.device_id = device_id
        self.device_class = device_class
        self.dir = state_dir / "update"
        self.root_file = root_file
        self.fail = fail or UpdateFail()
        self.trial_s = trial_s
        #: How long building the new slot takes before the restart.
        self.install_s = install_s
        self.restart: Callable[[], None] = lambda: None
        self._listeners: list[Callable[[UpdateStatus], None]] = []
        self._s = self._load(version)

    # ------------------------------------------------------------ the Updater interface

    def status(self) -> UpdateStatus:
        """What the birth message reports: the running version and slot, the floor, and the
        last update's outcome."""
        st = self._s.status
        return UpdateStatus(
            version=self.running_version(),
            outcome=st.get("outcome", "none"),
            target=st.get("target", ""),
            reason=st.get("reason", ""),
            slot=self._s.current,
            floor=self._s.floor,
            task_id=st.get("task_id"),
            at=st.get("at", 0.0),
        )

    def trust_root(self) -> Root:
        """The pinned root, verified as self-signed (parsed once per process and file)."""
        path = self.root_file.resolve()
        return _root_from(path, path.stat().st_mtime_ns)

    def running_version(self) -> str:
        """The version in the slot the agent runs from."""
        return str(self._s.slots[self._s.current]["version"])

    def floor(self) -> str:
        """The security floor: raised by each commit to its manifest's, never lowered."""
        return self._s.floor

    def staging_dir(self, task_id: str) -> Path:
        """Where the install handler downloads ``task_id``'s files."""
        path = self.dir / "staging" / task_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    def stage(
        self,
        *,
        manifest_raw: bytes,
        manifest: Manifest,
        files_dir: Path,
        task_id: str,
        deadline_s: float,
    ) -> None:
        """Take a verified release into the other slot and ask for a restart into it."""
        crashes = any(Path(f.path).name == CRASH_MARKER for f in manifest.files)
        fails = crashes or self.fail.fails(self.device_id, manifest.version)
        other = self._other()
        self._s.slots[other] = {
            "version": manifest.version,
            "committed": False,
            "manifest_digest": hashlib.sha256(manifest_raw).hexdigest(),
        }
        self._s.pending = {
            "slot": other,
            "version": manifest.version,
            "task_id": task_id,
            "fails": fails,
            "revert": False,
            "floor": manifest.security_floor,
        }
        shutil.rmtree(files_dir, ignore_errors=True)  # a real installer keeps it in the slot
        self._set("staged", target=manifest.version, task_id=task_id)
        self.restart()

    def request_revert(self, *, to_version: str, task_id: str, deadline_s: float) -> None:
        """Ask for a restart into the other slot; refused unless it holds ``to_version``,
        committed before, at or above the floor."""
        held = self._s.slots.get(self._other())
        if held is None or held["version"] != to_version or not held.get("committed"):
            raise ReleaseRefused(
                "rollback", f"the other slot does not hold a committed {to_version}"
            )
        if parse_version(to_version) < parse_version(self._s.floor):
            raise ReleaseRefused("below_floor", f"{to_version} is below the floor {self._s.floor}")
        self._s.pending = {
            "slot": self._other(),
            "version": to_version,
            "task_id": task_id,
            "fails": False,
            "revert": True,
            "floor": self._s.floor,
        }
        self._set("staged", target=to_version, task_id=task_id)
        self.restart()

    async def trial(self, checks: object = None) -> None:
        """In the new agent: pass (commit) or fail (roll back and restart) the trial."""
        import asyncio

        pending = self._s.pending
        if pending is None or self._s.current != pending["slot"]:
            return
        await asyncio.sleep(self.trial_s)
        if pending["fails"]:
            self._s.current = self._other()
            self._s.pending = None
            # A crash loop reports nothing until the old slot's agent is back up.
            self._set(
                "rolled_back",
                target=pending["version"],
                reason="crash_loop",
                task_id=pending["task_id"],
                notify=False,
            )
            log.info("sim: %s rolled back from %s", self.device_id, pending["version"])
            self.restart()
            return
        self._s.slots[self._s.current]["committed"] = True
        self._s.floor = _newer(self._s.floor, pending["floor"])
        self._s.pending = None
        outcome = "reverted" if pending["revert"] else "committed"
        self._set(outcome, target=pending["version"], task_id=pending["task_id"])

    def add_listener(self, cb: Callable[[UpdateStatus], None]) -> None:
        """``cb(status)`` on each change the device reports at once (a crash loop's roll-back
        is reported by the next agent's birth message instead)."""
        self._listeners.append(cb)

    # ------------------------------------------------------------ the simulated boot

    def boot(self) -> None:
        """Between two agents: switch to a staged slot (its trial starts)."""
        pending = self._s.pending
        if pending is None or self._s.current == pending["slot"]:
            return
        self._s.current = pending["slot"]
        self._set("trial", target=pending["version"], task_id=pending["task_id"])

    @property
    def in_trial(self) -> bool:
        return self._s.pending is not None and self._s.current == self._s.pending["slot"]

    # ------------------------------------------------------------ state

    def _other(self) -> Slot:
        return "b" if self._s.current == "a" else "a"

    def _set(
        self,
        outcome: str,
        *,
        target: str,
        task_id: str | None,
        reason: str = "",
        notify: bool = True,
    ) -> None:
        self._s.status = {
            "outcome": outcome,
            "target": target,
            "reason": reason,
            "task_id": task_id,
            "at": time.time(),
        }
        self._save()
        if not notify:
            return
        status = self.status()
        for cb in self._listeners:
            try:
                cb(status)
            except Exception:  # a listener's bug must not stop updates
                log.exception("update listener failed")

    def _load(self, version: str) -> _State:
        try:
            raw = json.loads((self.dir / STATE_FILE).read_text())
            return _State(**raw)
        except FileNotFoundError:
            return _State(slots={"a": {"version": version, "committed": True}})

    def _save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / (STATE_FILE + ".tmp")
        s = self._s
        data = {
            "current": s.current,
            "slots": s.slots,
            "floor": s.floor,
            "status": s.status,
            "pending": s.pending,
        }
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.dir / STATE_FILE)
