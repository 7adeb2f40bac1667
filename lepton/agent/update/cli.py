"""``lepton-agent update``: the device's A/B image state, and installs from a local bundle.

``provision BUNDLE.tar`` gives a new device its first image (slot ``a``, committed, with the
boot step in ``<root>/bin/lepton-slot``), verified against the pinned trust root like any
other;
``status`` prints the update status (as the birth message carries it) and ``boot.json``;
``install BUNDLE.tar`` verifies a signed bundle against the pinned trust root and hands it to
the installer (USB or offline updates; the installer verifies it again); ``revert`` asks for
the other slot's previously committed version; ``commit`` marks the running trial healthy
(an operator's override of the trial gate).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from lepton.agent.update import slots
from lepton.common.errors import LeptonError
from lepton.protocol.messages import new_id

if TYPE_CHECKING:
    from lepton.agent.config import AgentConfig


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("update", help="agent image updates (A/B slots)")
    parser.add_argument("--config", type=Path, default=None)
    cmds = parser.add_subparsers(dest="update_command", required=True)
    cmds.add_parser("status", help="the update status and boot.json")
    install = cmds.add_parser("install", help="install a signed bundle file")
    install.add_argument("bundle", type=Path)
    install.add_argument("--deadline", type=float, default=None, help="health deadline, s")
    revert = cmds.add_parser("revert", help="go back to the other slot's committed version")
    revert.add_argument("--to", dest="to_version", default=None)
    revert.add_argument("--deadline", type=float, default=None)
    cmds.add_parser("commit", help="mark the running trial healthy")
    prov = cmds.add_parser(
        "provision", help="a new device's first image: install a signed bundle into slot a"
    )
    prov.add_argument("bundle", type=Path)


def run(ns: argparse.Namespace) -> int:
    """Run ``lepton-agent update ...``; the exit status."""
    from lepton.agent.config import load_config
    from lepton.agent.update.updater import Updater

    try:
        config = load_config(ns.config)
        updater = Updater(config.update, config.agent.state_dir, device_class=config.device.class_)
        updater.synchronous = True  # this command waits for the installer
        deadline = getattr(ns, "deadline", None) or config.update.health_deadline_s
        if ns.update_command == "provision":
            return _provision(ns.bundle, config)
        if ns.update_command == "status":
            status = msgspec.to_builtins(updater.status())
            boot = slots.read_state(config.update.root)
            print(json.dumps({"status": status, "boot": boot}, indent=1))
            return 0
        if ns.update_command == "install":
            from lepton.common.releases import open_bundle_raw

            task_id = f"local-{new_id()}"
            staging = updater.staging_dir(task_id)
            trust = updater.trust_root()
            manifest, raw = open_bundle_raw(ns.bundle, staging, trust, now=time.time())
            updater.stage(
                manifest_raw=raw,
                manifest=manifest,
                files_dir=staging,
                task_id=task_id,
                deadline_s=deadline,
            )
        elif ns.update_command == "revert":
            prev = slots.read_state(config.update.root).get("previous") or {}
            to = ns.to_version or prev.get("version")
            if not to:
                print("lepton-agent update: no previous version to revert to", file=sys.stderr)
                return 1
            updater.request_revert(to_version=to, task_id=f"local-{new_id()}", deadline_s=deadline)
        elif ns.update_command == "commit":
            trial = updater.on_trial()
            if trial is None or not slots.commit(
                config.update.root, version=trial["version"], slot=trial["slot"]
            ):
                print("lepton-agent update: no trial running here", file=sys.stderr)
                return 1
    except (LeptonError, OSError) as exc:
        print(f"lepton-agent update: {exc}", file=sys.stderr)
        return 1
    status = updater.status()
    print(json.dumps(msgspec.to_builtins(status), indent=1))
    failed = updater.installer_rc not in (None, 0) or status.outcome == "install_failed"
    return 1 if failed else 0


def _provision(bundle: Path, config: AgentConfig) -> int:
    import tempfile

    from lepton.agent.telemetry.board import device_class_for, read_device_model, read_raw
    from lepton.agent.update.installer import InstallError, provision

    device_class = config.device.class_ or device_class_for(
        read_device_model(), read_raw(Path("/proc/device-tree/compatible")) or b""
    )
    with tempfile.TemporaryDirectory(prefix="lepton-provision-") as work:
        try:
            version = provision(
                config.update.root,
                bundle,
                trust_root_file=config.update.root_file,
                device_class=device_class,
                work_dir=Path(work),
            )
        except InstallError as exc:
            print(f"lepton-agent update provision: refused: {exc}", file=sys.stderr)
            return 1
    print(f"provisioned {version} in {config.update.root / 'slots' / 'a'} ({device_class})")
    return 0
