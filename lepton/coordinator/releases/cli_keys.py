"""``lepton release``: release keys, building and signing agent images, verifying bundles.

Offline commands (no coordinator): ``keys init|add-release|revoke|rotate-root|renew`` manage a key
directory (:mod:`lepton.coordinator.releases.keys`); ``build`` makes a signed bundle from an
image definition; ``sign`` adds signatures to a bundle's manifest; ``verify`` checks a bundle
as a device would. Exit codes, for CI pipelines: 0 done, 1 other error, 2 usage (bad
arguments, a definition or key file that cannot be used), 3 refused (``verify``: the bundle
fails verification; the reason is printed).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lepton.common.errors import ConfigError
from lepton.common.releases import (
    ReleaseRefused,
    check_policy,
    load_root,
    open_bundle_raw,
    root_chain,
)
from lepton.common.signing import KeyFileError, load_private_key
from lepton.coordinator.cli.client import CliError
from lepton.coordinator.cli.exitcodes import EXIT_ERROR, EXIT_OK, EXIT_REFUSED, EXIT_USAGE
from lepton.coordinator.releases.builder import (
    BuildError,
    build_bundle,
    manifest_digest,
    resign_bundle,
)
from lepton.coordinator.releases.keys import (
    RELEASE_KEY_DAYS,
    ROOT_DAYS,
    KeyStore,
    KeyStoreError,
    RootChange,
)


def add_commands(top: Any) -> None:
    """Mount ``release keys ...``, ``release build``, ``release sign``, ``release verify``."""
    rel = top.add_parser("release", help="release keys; build, sign and verify agent images")
    sub = rel.add_subparsers(dest="release_command", required=True, metavar="COMMAND")

    def command(parent: Any, name: str, handler: Any, help_text: str) -> argparse.ArgumentParser:
        cmd: argparse.ArgumentParser = parent.add_parser(name, help=help_text)
        cmd.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
        cmd.set_defaults(handler=handler)
        return cmd

    keys = sub.add_parser("keys", help="root and release keys, and the signed trust roots")
    ksub = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    init = command(ksub, "init", cmd_keys_init, "a root key, a release key, root v1")
    init.add_argument("--root-days", type=int, default=ROOT_DAYS)
    init.add_argument("--release-days", type=int, default=RELEASE_KEY_DAYS)
    add = command(ksub, "add-release", cmd_keys_add, "a new release key (next root version)")
    add.add_argument("--days", type=int, default=RELEASE_KEY_DAYS)
    revoke = command(ksub, "revoke", cmd_keys_revoke, "revoke a release key (next root)")
    revoke.add_argument("keyid", help="the key id, or a unique prefix of 8+ characters")
    command(ksub, "rotate-root", cmd_keys_rotate, "a new root key, signed by old and new")
    command(ksub, "renew", cmd_keys_renew, "the next root with a fresh expiry")
    for name in ("rotate-root", "renew"):
        ksub.choices[name].add_argument("--root-days", type=int, default=ROOT_DAYS)
    for cmd in (init, add, revoke, ksub.choices["rotate-root"], ksub.choices["renew"]):
        cmd.add_argument("--dir", required=True, type=Path, help="the key directory")

    build = command(sub, "build", cmd_build, "build and sign an agent image bundle")
    build.add_argument("definition", type=Path, help="firmware_images/<image>.toml")
    build.add_argument("--version", required=True, help="MAJOR.MINOR.PATCH")
    build.add_argument("--wheelhouse", required=True, type=Path, help="local wheels")
    build.add_argument("--wheel", action="append", default=[], type=Path, help="add a wheel")
    build.add_argument("--floor", help="security floor (default: the definition's)")
    build.add_argument("--expires-days", type=int, help="default: the definition's")
    build.add_argument("--model", action="append", default=[], type=Path, help="ship a model")
    build.add_argument("--trust", type=Path, help="a key directory: ship its root chain")
    build.add_argument("--download", action="store_true", help="let pip fetch missing wheels")
    build.add_argument("--key", action="append", required=True, type=Path, help="release key")
    build.add_argument("--out", required=True, type=Path, help="output directory")

    sign = command(sub, "sign", cmd_sign, "add signatures to a bundle's manifest")
    sign.add_argument("bundle", type=Path)
    sign.add_argument("--key", action="append", required=True, type=Path, help="release key")
    sign.add_argument("--out", type=Path, help="write here (default: in place)")

    verify = command(sub, "verify", cmd_verify, "verify a bundle as a device would")
    verify.add_argument("bundle", type=Path)
    verify.add_argument("--root", required=True, type=Path, help="the pinned root.json")
    verify.add_argument("--device-class", help="also check the device class")
    verify.add_argument("--running", help="also refuse versions not above this one")
    verify.add_argument("--floor", help="also refuse versions below this floor")
    verify.add_argument("--kind", choices=("agent", "model"), help="default: the bundle's")
    _mount_registry_commands(sub)


def _mount_registry_commands(sub: Any) -> None:
    """The registry's commands (publish, ls, show: ``lepton.coordinator.releases.cli``) join
    this group through its ``add_release_commands(sub)`` when it has one; the offline
    commands above work without the registry's dependencies."""
    try:
        registry = importlib.import_module("lepton.coordinator.releases.cli")
    except ImportError:
        return
    mount = getattr(registry, "add_release_commands", None)
    if mount is not None:
        mount(sub)


def _report(args: argparse.Namespace, data: dict[str, Any], lines: list[str]) -> None:
    if getattr(args, "json", False):
        sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
    else:
        sys.stdout.write("\n".join(lines) + "\n")


def _keys(paths: list[Path]) -> list[Any]:
    try:
        return [load_private_key(p) for p in paths]
    except KeyFileError as exc:
        raise CliError(str(exc), EXIT_USAGE) from exc


def _store(directory: Path) -> KeyStore:
    return KeyStore(directory)


def _changed(args: argparse.Namespace, change: RootChange, what: str) -> int:
    root = change.root
    _report(
        args,
        {"root_version": root.version, "root": str(change.path), "keyid": change.keyid},
        [f"{what}: {change.keyid}", f"root v{root.version}: {change.path}"],
    )
    return EXIT_OK


def _keystore(call: Any, *a: Any, **kw: Any) -> Any:
    try:
        return call(*a, **kw)
    except (KeyStoreError, ReleaseRefused) as exc:
        raise CliError(str(exc), EXIT_ERROR) from exc


def cmd_keys_init(args: argparse.Namespace) -> int:
    store = _store(args.dir)
    change, release = _keystore(
        store.init, root_days=args.root_days, release_days=args.release_days
    )
    _report(
        args,
        {"root_key": change.keyid, "release_key": release, "root": str(change.path)},
        [f"root key    {change.keyid}", f"release key {release}", f"root v1: {change.path}"],
    )
    return EXIT_OK


def cmd_keys_add(args: argparse.Namespace) -> int:
    change = _keystore(_store(args.dir).add_release_key, days=args.days)
    return _changed(args, change, "release key")


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    store = _store(args.dir)
    root = _keystore(store.current)
    matches = [k.keyid for k in root.release_keys if k.keyid.startswith(args.keyid.lower())]
    if len(args.keyid) < 8 or len(matches) != 1:
        raise CliError(
            f"{args.keyid!r} names no single release key of root v{root.version}", EXIT_USAGE
        )
    return _changed(args, _keystore(store.revoke, matches[0]), "revoked")


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    change = _keystore(_store(args.dir).rotate_root, root_days=args.root_days)
    return _changed(args, change, "new root key")


def cmd_keys_renew(args: argparse.Namespace) -> int:
    change = _keystore(_store(args.dir).renew, root_days=args.root_days)
    return _changed(args, change, "renewed")


def cmd_build(args: argparse.Namespace) -> int:
    keys = _keys(args.key)
    roots = [p for _, p in root_chain(args.trust)] if args.trust else []
    try:
        bundle = build_bundle(
            args.definition,
            version=args.version,
            wheelhouse=args.wheelhouse,
            out_dir=args.out,
            keys=keys,
            wheels=args.wheel,
            floor=args.floor,
            expires_days=args.expires_days,
            models=args.model,
            roots=roots,
            download=args.download,
        )
    except (ConfigError, ValueError) as exc:
        raise CliError(str(exc), EXIT_USAGE) from exc
    except BuildError as exc:
        raise CliError(str(exc), EXIT_ERROR) from exc
    digest, size = manifest_digest(bundle)
    _report(
        args,
        {"bundle": str(bundle), "manifest_digest": digest, "manifest_size": size},
        [str(bundle), f"manifest sha256 {digest} ({size} bytes)"],
    )
    return EXIT_OK


def cmd_sign(args: argparse.Namespace) -> int:
    keys = _keys(args.key)
    try:
        bundle = resign_bundle(args.bundle, keys, args.out)
    except ReleaseRefused as exc:
        raise CliError(f"refused: {exc}", EXIT_REFUSED) from exc
    except (BuildError, ValueError) as exc:
        raise CliError(str(exc), EXIT_ERROR) from exc
    digest, size = manifest_digest(bundle)
    _report(
        args,
        {"bundle": str(bundle), "manifest_digest": digest, "manifest_size": size},
        [str(bundle), f"manifest sha256 {digest} ({size} bytes)"],
    )
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    now = time.time()
    try:
        raw_root = args.root.read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {args.root}: {exc.strerror}", EXIT_USAGE) from exc
    try:
        root = load_root(raw_root, trusted=None, now=now)
        with tempfile.TemporaryDirectory() as tmp:
            m, raw = open_bundle_raw(args.bundle, Path(tmp) / "files", root, now=now)
        if args.device_class or args.running or args.floor or args.kind:
            check_policy(
                m,
                kind=args.kind or m.kind,
                device_class=args.device_class or m.device_classes[0],
                running=args.running,
                floor=args.floor,
            )
    except ReleaseRefused as exc:
        if getattr(args, "json", False):
            _report(args, {"ok": False, "reason": exc.reason, "detail": exc.detail}, [])
        raise CliError(f"refused: {exc}", EXIT_REFUSED) from exc
    except OSError as exc:
        raise CliError(f"cannot read {args.bundle}: {exc.strerror}", EXIT_USAGE) from exc
    digest, size = hashlib.sha256(raw).hexdigest(), len(raw)
    _report(
        args,
        {
            "ok": True,
            "name": m.name,
            "version": m.version,
            "kind": m.kind,
            "device_classes": m.device_classes,
            "files": len(m.files),
            "security_floor": m.security_floor,
            "expires": m.expires,
            "manifest_digest": digest,
            "manifest_size": size,
        },
        [
            f"ok: {m.name} {m.version} ({m.kind}) for {', '.join(m.device_classes)}",
            f"{len(m.files)} files verified; floor {m.security_floor}; expires {m.expires}",
            f"manifest sha256 {digest}",
        ],
    )
    return EXIT_OK
