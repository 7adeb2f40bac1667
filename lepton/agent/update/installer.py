"""The privileged installer: a staged agent image into the inactive slot, then a trial.

Run by ``lepton-slot service`` (``lepton-update.service``, root) with the *current* slot's
interpreter, or by the agent itself in ``direct`` mode::

    <root>/current/venv/bin/python -m lepton.agent.update.installer --root R --state-dir S

It consumes ``<state_dir>/update/request.json`` (written by :class:`~lepton.agent.update.
updater.Updater`) and trusts nothing the agent staged: the manifest is verified again against
the device's pinned trust root (``update.root_file``), the policy checked against the
device's own committed version and floor (from ``boot.json``), and the files verified again
*after* they are copied into the slot (the staging directory stays agent-writable).

Install: mark the slot ``installing`` (``previous`` cleared first when it names that slot),
clear it, copy the files to ``slots/<x>/bundle``, ``python -m venv slots/<x>/venv``,
``pip install --no-index --find-links bundle/wheels <install.requirement>``, smoke-check
``venv/bin/lepton-agent version``, then begin the trial (``boot.json`` first, ``current``
switched second) and restart the agent. Any failure before the switch records
``install_failed`` with its reason and leaves the running version alone. An agent image with
no ``install`` requirement is refused (``no_install``): an A/B slot must hold a runnable agent.

Revert: the other slot must hold ``previous`` == ``to_version`` and ``to_version`` >= the floor;
then the same trial path (kind ``revert``).
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lepton.agent.update import slots
from lepton.common.errors import LeptonError

if TYPE_CHECKING:
    from lepton.protocol.releases import Manifest, Root

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.dsse.json"
PIP_TIMEOUT_S = 1800
SMOKE_TIMEOUT_S = 120


class InstallError(LeptonError):
    """The install stopped before the switch; ``reason`` is reported as the outcome's."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _child_env() -> dict[str, str]:
    # The new slot's tools run with the slot's own code only: nothing the caller's environment
    # adds to sys.path (or user site-packages) reaches them.
    drop = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "PIP_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _run(cmd: list[str], *, timeout: float, what: str) -> str:
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, check=False, env=_child_env()
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InstallError(what, str(exc)[:150]) from exc
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
        raise InstallError(what, f"exit {done.returncode}: {tail[0][:150]}")
    return done.stdout


def install(
    root: Path,
    request: dict[str, Any],
    *,
    trust_root_file: Path,
    device_class: str,
    restart_command: str | None,
    staging_root: Path,
    now: float | None = None,
) -> str:
    """Install the staged image named by ``request`` (its files under ``staging_root``);
    returns the trial's version."""
    now = time.time() if now is None else now
    task_id = request.get("task_id")
    state = slots.read_state(root)
    committed = state.get("committed")
    if not committed:
        raise InstallError("not_provisioned", "boot.json has no committed slot")
    if state.get("trial"):
        raise InstallError("busy", f"{state['trial']['version']} is on trial")
    files = Path(request["files"]).resolve()
    if not files.is_relative_to(staging_root.resolve()):
        raise InstallError("malformed", "the staged files are not in the staging directory")
    raw, manifest = _verify(
        root, request, state, trust_root_file=trust_root_file, device_class=device_class, now=now
    )
    target = slots.other(committed["slot"])
    # Clear `previous` before touching its slot: a revert never finds a half-written one.
    if state.get("previous") and state["previous"]["slot"] == target:
        state["previous"] = None
    state["installing"] = {
        "slot": target,
        "version": manifest.version,
        "task_id": task_id,
        "pid": os.getpid(),
        "at": now,
    }
    slots._record(state, "installing", manifest.version, "", task_id)
    slots.write_state(root, state)
    slots.crash_point("install.marked")
    slot_dir = root / "slots" / target
    shutil.rmtree(slot_dir, ignore_errors=True)
    slots.crash_point("install.slot_cleared")
    _copy(manifest, raw, files, slot_dir)
    slots.crash_point("install.files_copied")
    _build(manifest, slot_dir)
    slots.begin_trial(
        root,
        slot=target,
        version=manifest.version,
        # From the switch, not from the request: a slow install does not eat the trial.
        deadline=time.time() + float(request.get("deadline_s", 300.0)),
        task_id=task_id,
        kind="install",
    )
    _restart(restart_command)
    return str(manifest.version)


def provision(
    root: Path,
    bundle: Path,
    *,
    trust_root_file: Path,
    device_class: str,
    work_dir: Path,
    now: float | None = None,
) -> str:
    """A device's first image: verify ``bundle`` against the pinned root (signatures, class,
    expiry; no running version yet), install it into slot ``a`` with its venv, put the boot
    step in ``<root>/bin/lepton-slot`` and commit it outright. Refused on a device that
    already has a committed image (it takes updates instead). Returns the version."""
    from lepton.common import releases

    now = time.time() if now is None else now
    if slots.read_state(root).get("committed"):
        raise InstallError("busy", f"{root} already holds a committed image")
    try:
        trust = releases.load_root(trust_root_file.read_bytes(), trusted=None, now=now)
        staging = work_dir / "provision"
        manifest, raw = releases.open_bundle_raw(bundle, staging, trust, now=now)
        releases.check_policy(
            manifest, kind="agent", device_class=device_class, running=None, floor=None
        )
    except releases.ReleaseRefused as exc:
        raise InstallError(exc.reason, exc.detail) from exc
    except OSError as exc:
        raise InstallError("malformed", str(exc)[:150]) from exc
    if manifest.install is None:
        raise InstallError("no_install", "an agent image needs an install requirement")
    slot_dir = root / "slots" / "a"
    shutil.rmtree(slot_dir, ignore_errors=True)
    _copy(manifest, raw, staging, slot_dir)
    _build(manifest, slot_dir)
    boot_step = root / "bin" / "lepton-slot"
    boot_step.parent.mkdir(parents=True, exist_ok=True)
    tmp = boot_step.with_name(".lepton-slot.tmp")
    shutil.copyfile(slots.__file__, tmp)
    tmp.chmod(0o755)
    os.replace(tmp, boot_step)
    slots.provision(root, slot="a", version=manifest.version, floor=manifest.security_floor)
    shutil.rmtree(staging, ignore_errors=True)
    return str(manifest.version)


def device_trust(root_file: Path, image_root: Path, *, now: float) -> Root:
    """The device's trust root: the pinned ``root_file``, then the newer roots the running
    image carries (``<root>/current/bundle/trust/root.<N>.json``, verified into the slot at
    its install), each by the rotation rules (:func:`lepton.common.releases.apply_root_chain`).
    """
    from lepton.common import releases

    pinned: Root = releases.load_root(root_file.read_bytes(), trusted=None, now=now)
    chain = image_root / slots.CURRENT / "bundle" / releases.ROOT_CHAIN_DIR
    newest, _ = releases.apply_root_chain(pinned, chain, now=now)
    return newest


def _verify(
    root: Path,
    request: dict[str, Any],
    state: dict[str, Any],
    *,
    trust_root_file: Path,
    device_class: str,
    now: float,
) -> tuple[bytes, Manifest]:
    from lepton.common import releases  # the image's own verifier (lepton.common)

    try:
        trust = device_trust(trust_root_file, root, now=now)
        raw = base64.b64decode(request["manifest_b64"], validate=True)
        manifest: Manifest = releases.verify_manifest(raw, trust, now=now)
        releases.check_policy(
            manifest,
            kind="agent",
            device_class=device_class,
            running=state["committed"]["version"],
            floor=state.get("floor"),
        )
    except releases.ReleaseRefused as exc:
        raise InstallError(exc.reason, exc.detail) from exc
    except (OSError, ValueError) as exc:
        raise InstallError("malformed", str(exc)[:150]) from exc
    if manifest.install is None:
        raise InstallError("no_install", "an agent image needs an install requirement")
    return raw, manifest


def _copy(manifest: Manifest, raw: bytes, staging: Path, slot_dir: Path) -> None:
    from lepton.common import releases

    bundle = slot_dir / "bundle"
    base = staging.resolve()
    for entry in manifest.files:
        dest = bundle / entry.path
        dest.parent.mkdir(parents=True, exist_ok=True)
        _copy_one(base, entry.path, entry.length, dest)
    (slot_dir / MANIFEST_FILE).write_bytes(raw)
    try:
        releases.verify_files(manifest, bundle)  # the copy, not the agent-writable staging
    except releases.ReleaseRefused as exc:
        raise InstallError(exc.reason, exc.detail) from exc


def _copy_one(base: Path, path: str, length: int, dest: Path) -> None:
    """Copy one listed file out of the agent-writable staging: a regular file reached with
    no link at any step (each component opened ``O_NOFOLLOW`` from its parent's descriptor,
    so a link swapped in meanwhile is refused too: a root process must never copy what a
    link points at into a world-readable slot), of exactly the listed length (the hash is
    checked on the copy)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    parts = path.split("/")
    fds = []
    try:
        fds.append(os.open(base, flags | os.O_DIRECTORY))
        for part in parts[:-1]:
            fds.append(os.open(part, flags | os.O_DIRECTORY, dir_fd=fds[-1]))
        fd = os.open(parts[-1], flags, dir_fd=fds[-1])
    except OSError as exc:
        raise InstallError("missing_file", f"{path}: {exc.strerror}") from exc
    finally:
        for d in fds:
            os.close(d)
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size != length:
            raise InstallError("tampered", f"{path}: not a regular file of {length} bytes")
        with dest.open("wb") as out:
            shutil.copyfileobj(fh, out)


def _build(manifest: Manifest, slot_dir: Path) -> None:
    assert manifest.install is not None
    venv = slot_dir / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], timeout=PIP_TIMEOUT_S, what="venv_failed")
    _run(
        [
            str(venv / "bin" / "python"), "-m", "pip", "install", "--no-index",
            "--disable-pip-version-check", "--no-cache-dir",
            "--find-links", str(slot_dir / "bundle" / "wheels"),
            manifest.install.requirement,
        ],
        timeout=PIP_TIMEOUT_S,
        what="pip_failed",
    )  # fmt: skip
    slots.crash_point("install.venv_built")
    out = _run(
        [str(venv / "bin" / "lepton-agent"), "version"],
        timeout=SMOKE_TIMEOUT_S,
        what="smoke_failed",
    )
    if out.strip() != manifest.version:
        raise InstallError("smoke_failed", f"lepton-agent version says {out.strip()[:40]!r}")
    slots.crash_point("install.smoked")


def revert(
    root: Path, request: dict[str, Any], *, restart_command: str | None, now: float | None = None
) -> str:
    """Switch to the other slot's previously committed ``to_version`` (on trial)."""
    now = time.time() if now is None else now
    to_version = str(request["to_version"])
    state = slots.read_state(root)
    previous, committed = state.get("previous"), state.get("committed")
    if state.get("trial"):
        raise InstallError("busy", "a trial is running")
    if not previous or not committed or previous["slot"] == committed["slot"]:
        raise InstallError("no_previous", "the other slot holds no committed version")
    if previous["version"] != to_version:
        raise InstallError("no_previous", f"the other slot holds {previous['version']}")
    if slots.version_tuple(to_version) < slots.version_tuple(state.get("floor", "0.0.0")):
        raise InstallError("below_floor", f"{to_version} < {state['floor']}")
    slots.begin_trial(
        root,
        slot=previous["slot"],
        version=to_version,
        deadline=now + float(request.get("deadline_s", 300.0)),
        task_id=request.get("task_id"),
        kind="revert",
    )
    _restart(restart_command)
    return to_version


def _restart(command: str | None) -> None:
    if command:
        # The restart stops this agent (and, in direct mode, this process's parent): best
        # effort; the trial is recorded and `current` switched already, so a failed restart
        # only delays the trial to the next start (or the deadline check rolls it back).
        subprocess.run(command.split(), check=False, timeout=120)


def fail(root: Path, request: dict[str, Any], reason: str, detail: str) -> None:
    """Record ``install_failed`` (the running version is untouched) and empty the slot the
    install was writing (nothing half-verified stays on disk)."""
    state = slots.read_state(root)
    inst = state.get("installing")
    if inst and inst.get("slot") in slots.SLOTS and inst.get("slot") != slots.current_slot(root):
        shutil.rmtree(root / "slots" / inst["slot"], ignore_errors=True)
    state["installing"] = None
    target = str(request.get("to_version") or request.get("version") or "")
    if inst:
        target = inst.get("version", target)
    text = f"{reason}: {detail}" if detail else reason
    slots._record(state, "install_failed", target, text, request.get("task_id"))
    slots.write_state(root, state)


def take_request(state_dir: Path) -> dict[str, Any] | None:
    """Read and remove ``request.json`` (a crash never re-runs the same request)."""
    path = state_dir / "update" / "request.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        path.unlink(missing_ok=True)
        return {"kind": "malformed"}
    path.unlink(missing_ok=True)
    return data if isinstance(data, dict) else {"kind": "malformed"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lepton-installer")
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=None, help="agent TOML (the default)")
    # Direct mode: the agent passes what it runs with (service mode reads the config).
    parser.add_argument("--root-file", type=Path, default=None)
    parser.add_argument("--device-class", default=None)
    parser.add_argument("--restart-command", default=None)
    ns = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(levelname)s %(name)s: %(message)s")
    from lepton.agent.config import load_config
    from lepton.agent.telemetry.board import device_class_for, read_device_model

    config = load_config(ns.config, identity=False)
    request = take_request(ns.state_dir)
    if request is None:
        return 0
    restart = config.update.restart_command if ns.restart_command is None else ns.restart_command
    root_file = ns.root_file or config.update.root_file
    try:
        if request.get("kind") == "install":
            device_class = (
                ns.device_class or config.device.class_ or device_class_for(read_device_model())
            )
            version = install(
                ns.root,
                request,
                trust_root_file=root_file,
                device_class=device_class,
                restart_command=restart or None,
                staging_root=ns.state_dir / "update" / "staging",
            )
        elif request.get("kind") == "revert":
            version = revert(ns.root, request, restart_command=restart or None)
        else:
            fail(ns.root, request, "malformed", "request.json is not an install or a revert")
            return 1
    except InstallError as exc:
        log.error("update failed: %s", exc)  # noqa: TRY400
        fail(ns.root, request, exc.reason, exc.detail)
        return 1
    except (KeyError, TypeError, ValueError) as exc:
        fail(ns.root, request, "malformed", str(exc)[:150])
        return 1
    except Exception as exc:  # recorded, so the device reports why (never a silent failure)
        log.exception("installer error")
        fail(ns.root, request, "installer_error", f"{type(exc).__name__}: {exc}"[:150])
        return 1
    log.info("on trial: %s", version)
    return 0


if __name__ == "__main__":
    sys.exit(main())
