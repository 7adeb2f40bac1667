"""The agent's side of A/B updates: stage an image, ask for a revert, gate a trial, report.

``mode = "service"`` (a real device): the agent cannot write ``<root>``; it writes
``<state_dir>/update/request.json`` (an install or a revert) or ``health.json`` (a healthy
verdict) and the root-owned ``lepton-update.service`` (started by ``lepton-update.path``)
acts on them with :mod:`lepton.agent.update.slots` and :mod:`lepton.agent.update.installer`.

``mode = "direct"`` (the agent owns ``<root>``: tests, containers, boards without the
privileged units): the agent runs the installer as a subprocess of its own interpreter and
commits a healthy trial itself. With no ``restart_command`` the agent then stops with
:data:`~lepton.agent.update.health.EXIT_RESTART`, which ``Restart=on-failure`` (or any
supervisor) turns into a start of the new image through ``lepton-slot boot``.

:meth:`Updater.status` reads ``boot.json`` (world-readable) and maps it to the
:class:`~lepton.protocol.messages.UpdateStatus` of the birth message.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from lepton import agent as agent_pkg
from lepton.agent.update import slots
from lepton.agent.update.health import HealthChecks, UnhealthyError, wait_healthy
from lepton.protocol.messages import UpdateStatus
from lepton.protocol.releases import Envelope, Manifest

if TYPE_CHECKING:
    from lepton.agent.config import UpdateConfig
    from lepton.protocol.releases import Root

log = logging.getLogger(__name__)

_OUTCOMES = frozenset(
    {
        "none",
        "staged",
        "installing",
        "trial",
        "committed",
        "rolled_back",
        "install_failed",
        "refused",
        "reverted",
    }
)


class Updater:
    """A/B updates of this device's agent image (see the module docstring)."""

    def __init__(
        self,
        config: UpdateConfig,
        state_dir: Path,
        *,
        device_class: str | None = None,
        on_restart: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.root = config.root
        self.update_dir = state_dir / "update"
        self.state_dir = state_dir
        self.device_class = device_class
        #: Called (direct mode, no restart_command) when the agent must stop for a new image.
        self.on_restart = on_restart
        self._listeners: list[Callable[[UpdateStatus], None]] = []
        self._last: UpdateStatus | None = None
        self._lock = threading.Lock()
        # The image this process runs: a trial of the other slot means it must make way.
        self._own_slot = slots.current_slot(self.root)
        self._restarting = False
        #: True: stage() and request_revert() run the installer (direct mode) before they
        #: return (``lepton-agent update``); False: in a thread (the agent).
        self.synchronous = False
        #: The exit status of the last installer this process ran (direct mode).
        self.installer_rc: int | None = None

    # ------------------------------------------------------------ reading

    def status(self) -> UpdateStatus:
        """The device's update state, from ``boot.json`` (and a pending request)."""
        state = slots.read_state(self.root)
        last = state.get("last") or {}
        outcome = str(last.get("outcome", "none"))
        if (self.update_dir / "request.json").exists():
            outcome = "staged"
        task = last.get("task_id")
        return UpdateStatus(
            version=self.running_version(),
            outcome=outcome if outcome in _OUTCOMES else "none",  # type: ignore[arg-type]
            target=str(last.get("target", ""))[:32],
            reason=str(last.get("reason", ""))[:200],
            slot=slots.current_slot(self.root) or "",  # type: ignore[arg-type]
            floor=str(state.get("floor", "")),
            task_id=task if isinstance(task, str) and task else None,
            at=float(last.get("at") or 0.0),
        )

    def running_version(self) -> str:
        """The version of the image ``current`` points at (this agent's own without one)."""
        state = slots.read_state(self.root)
        here = slots.current_slot(self.root)
        trial, committed = state.get("trial"), state.get("committed")
        if trial and trial.get("slot") == here:
            return str(trial["version"])
        if committed and committed.get("slot") == here:
            return str(committed["version"])
        return agent_pkg.__version__

    def floor(self) -> str:
        """The device's security floor: no version below it is ever installed or reverted to."""
        return str(slots.read_state(self.root).get("floor", "0.0.0"))

    def trust_root(self) -> Root:
        """The device's trust root: the pinned ``update.root_file``, then the newer roots the
        running image carries (``bundle/trust/root.<N>.json``) by the rotation rules."""
        from lepton.agent.update.installer import device_trust

        return device_trust(self.config.root_file, self.root, now=time.time())

    def staging_dir(self, task_id: str) -> Path:
        """An empty-or-partial directory for ``task_id``'s files (agent-writable)."""
        path = self.update_dir / "staging" / task_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    # ------------------------------------------------------------ requests

    def stage(
        self,
        *,
        manifest_raw: bytes,
        manifest: Manifest,
        files_dir: Path,
        task_id: str,
        deadline_s: float,
    ) -> None:
        """Hand a verified, downloaded image to the installer (which verifies it again) and
        return: the install, trial and restart follow on their own."""
        self._request(
            {
                "kind": "install",
                "task_id": task_id,
                "version": manifest.version,
                "manifest_b64": base64.b64encode(manifest_raw).decode(),
                "files": str(files_dir.resolve()),
                "deadline_s": float(deadline_s),
            }
        )

    def request_revert(self, *, to_version: str, task_id: str, deadline_s: float) -> None:
        """Switch back to the other slot's previously committed ``to_version``.

        Raises ``ReleaseRefused`` (``rollback``: the other slot does not hold it;
        ``below_floor``) before anything is requested."""
        from lepton.common.releases import ReleaseRefused

        state = slots.read_state(self.root)
        prev = state.get("previous")
        if not prev or prev.get("version") != to_version:
            held = prev.get("version") if prev else "nothing"
            raise ReleaseRefused("rollback", f"the other slot holds {held}, not {to_version}")
        if slots.version_tuple(to_version) < slots.version_tuple(self.floor()):
            raise ReleaseRefused("below_floor", f"{to_version} < {self.floor()}")
        self._request(
            {
                "kind": "revert",
                "task_id": task_id,
                "to_version": to_version,
                "deadline_s": float(deadline_s),
            }
        )

    def _request(self, request: dict[str, Any]) -> None:
        self.update_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.update_dir / "request.json.tmp"
        tmp.write_text(json.dumps(request))
        # The path unit fires on the rename: the service never reads half a request.
        os.replace(tmp, self.update_dir / "request.json")
        self.poll()
        if self.config.mode == "direct" and self.synchronous:
            self._run_installer()
        elif self.config.mode == "direct":
            threading.Thread(target=self._run_installer, name="installer", daemon=True).start()

    def _run_installer(self) -> None:
        cmd = [
            # -I: the installer imports this image's lepton only (not the working directory).
            sys.executable, "-I", "-m", "lepton.agent.update.installer",
            "--root", str(self.root), "--state-dir", str(self.state_dir),
            "--root-file", str(self.config.root_file),
            "--restart-command", self.config.restart_command,
        ]  # fmt: skip
        if self.device_class:
            cmd += ["--device-class", self.device_class]
        with self._lock:
            done = subprocess.run(cmd, check=False, capture_output=True, text=True)
        self.installer_rc = done.returncode
        if done.returncode != 0:
            log.warning("installer failed: %s", done.stderr.strip()[-300:])
        self.poll()

    # ------------------------------------------------------------ the trial gate

    def on_trial(self) -> dict[str, Any] | None:
        """The trial this agent's image is on (``current`` is its slot), else None."""
        state = slots.read_state(self.root)
        trial = state.get("trial")
        if trial and trial.get("slot") == slots.current_slot(self.root):
            return dict(trial)
        return None

    async def trial(self, checks: HealthChecks) -> None:
        """In a new image's agent: wait for health until the trial's deadline, then commit
        (direct) or write ``health.json`` (service). :class:`UnhealthyError` when it does not
        come; the caller exits non-zero. Returns at once when no trial is running."""
        trial = self.on_trial()
        if trial is None:
            return
        slot_dir = self.root / "slots" / str(trial["slot"])
        manifest = _slot_manifest(slot_dir)
        remaining = float(trial["deadline"]) - time.time()
        log.info("on trial: %s (%.0f s to prove healthy)", trial["version"], remaining)
        try:
            await wait_healthy(
                checks,
                bundle=slot_dir / "bundle",
                test=manifest.self_test if manifest else None,
                timeout=remaining,
            )
        except UnhealthyError as exc:
            await asyncio.to_thread(self._unhealthy, trial, exc.reason)
            raise
        floor = manifest.security_floor if manifest else "0.0.0"
        if self.config.mode == "direct":
            if not slots.commit(
                self.root, version=str(trial["version"]), slot=str(trial["slot"]), floor=floor
            ):
                raise UnhealthyError("trial_ended")  # rolled back meanwhile (deadline check)
        else:
            self._verdict({"healthy": True, "version": trial["version"], "slot": trial["slot"],
                           "floor": floor, "at": time.time()})  # fmt: skip
        log.info("healthy: %s", trial["version"])
        self.poll()

    def _unhealthy(self, trial: dict[str, Any], reason: str) -> None:
        # Roll back now, with the reason, rather than by a crash loop that would hide it:
        # direct mode itself; service mode through an unhealthy verdict for the service.
        if self.config.mode == "direct":
            state = slots.read_state(self.root)
            now = state.get("trial")
            if now and now.get("slot") == trial["slot"] and now.get("version") == trial["version"]:
                slots.rollback(self.root, state, f"unhealthy: {reason}")
        else:
            self._verdict({"healthy": False, "reason": reason, "version": trial["version"],
                           "slot": trial["slot"], "at": time.time()})  # fmt: skip
        self.poll()

    def _verdict(self, verdict: dict[str, Any]) -> None:
        self.update_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.update_dir / "health.json.tmp"
        tmp.write_text(json.dumps(verdict))
        os.replace(tmp, self.update_dir / "health.json")  # the path unit fires on the rename

    # ------------------------------------------------------------ changes

    def add_listener(self, cb: Callable[[UpdateStatus], None]) -> None:
        """``cb(status)`` on every change :meth:`poll` (or :meth:`watch`) sees."""
        self._listeners.append(cb)

    def poll(self) -> UpdateStatus:
        """Read the status; tell the listeners when it changed. In direct mode with no
        ``restart_command``, a trial of another slot than this process's (the installer or
        ``lepton-agent update`` started it) calls ``on_restart`` once."""
        trial = slots.read_state(self.root).get("trial")
        if (
            self.config.mode == "direct"
            and not self.config.restart_command
            and trial
            and trial.get("slot") != self._own_slot
            and slots.current_slot(self.root) == trial.get("slot")
            and not self._restarting
            and self.on_restart is not None
        ):
            self._restarting = True
            self.on_restart()
        now = self.status()
        if now != self._last:
            self._last = now
            for cb in self._listeners:
                try:
                    cb(now)
                except Exception:  # a listener's bug must not stop updates
                    log.exception("update listener failed")
        return now

    async def watch(self, interval: float = 2.0) -> None:
        """Poll forever (changes made by the service or the installer show up here)."""
        while True:
            with contextlib.suppress(OSError, ValueError):
                await asyncio.to_thread(self.poll)
            await asyncio.sleep(interval)


def _slot_manifest(slot_dir: Path) -> Manifest | None:
    # Verified by the installer when the slot was written (the slot is root-owned): decoded
    # only, for the self-test and the floor.
    try:
        env = msgspec.json.decode((slot_dir / "manifest.dsse.json").read_bytes(), type=Envelope)
        return msgspec.json.decode(env.payload_bytes(), type=Manifest)
    except (OSError, ValueError, msgspec.DecodeError):
        return None
