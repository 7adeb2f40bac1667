"""The attack matrix: every way to hand a device a release it must not take, each built as a
real signed bundle (or root), each refused with its own reason.

Each attack is a function registered with the reason it must be refused for; one test runs
them all (``test_attack_is_refused[...]``), and the positive controls below prove the same
bundles, unattacked, are accepted (so no attack passes for the wrong reason).
"""

from __future__ import annotations

import base64
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest

from lepton.common.releases import (
    BUNDLE_MANIFEST,
    ReleaseRefused,
    apply_root_chain,
    check_policy,
    load_root,
    open_bundle,
    open_bundle_raw,
    read_bundle_manifest,
    verify_files,
    verify_manifest,
)
from lepton.common.signing import canonical_json, generate_key, public_key, sign
from lepton.protocol.releases import MAX_ENVELOPE_BYTES, ROOT_TYPE, Root
from tests.common.releasekit import (
    FILES,
    HOUR,
    NOW,
    bundle,
    good,
    make_trust,
    manifest_for,
    regular,
    signed,
    special,
    write_tar,
)

Attack = Callable[[Path], object]
Member = tuple[tarfile.TarInfo, bytes | None]
ATTACKS: dict[str, tuple[str, Attack]] = {}


def attack(reason: str) -> Callable[[Attack], Attack]:
    def register(fn: Attack) -> Attack:
        ATTACKS[fn.__name__] = (reason, fn)
        return fn

    return register


def open_(tmp: Path, trust_root: Root, raw: bytes, files: dict[str, bytes] = FILES) -> object:
    return open_bundle(bundle(tmp / "b.tar", raw, files), tmp / "out", trust_root, now=NOW)


def open_members(tmp: Path, trust_root: Root, members: list[Member]) -> object:
    return open_bundle(write_tar(tmp / "b.tar", members), tmp / "out", trust_root, now=NOW)


def doctored(raw: bytes, edit: Callable[[dict], None]) -> bytes:  # type: ignore[type-arg]
    doc = json.loads(raw)
    edit(doc)
    return json.dumps(doc).encode()


def flip(b64: str, at: int = 5) -> str:
    data = bytearray(base64.b64decode(b64))
    data[at] ^= 0x01
    return base64.b64encode(bytes(data)).decode()


# --- signatures ---------------------------------------------------------------------------


@attack("unsigned")
def unsigned(tmp: Path) -> object:
    t = make_trust()
    _, raw = good(t)
    return open_(tmp, t.root, doctored(raw, lambda d: d.update(signatures=[])))


@attack("unknown_key")
def signed_by_an_unknown_key(tmp: Path) -> object:
    t = make_trust()
    return open_(tmp, t.root, signed(manifest_for(FILES), [generate_key()]))


@attack("revoked_key")
def signed_by_a_revoked_key(tmp: Path) -> object:
    t = make_trust()
    revoked = msgspec.structs.replace(t.root, revoked=[t.root.release_keys[0].keyid])
    return open_(tmp, revoked, good(t)[1])


@attack("expired_key")
def signed_by_an_expired_key(tmp: Path) -> object:
    t = make_trust(release_expires=int(NOW) - 1)
    return open_(tmp, t.root, good(t)[1])


@attack("bad_signature")
def below_the_threshold(tmp: Path) -> object:
    t = make_trust(releases=2, release_threshold=2)
    return open_(tmp, t.root, signed(manifest_for(FILES), t.release[:1]))


@attack("bad_signature")
def payload_bytes_flipped(tmp: Path) -> object:
    t = make_trust()
    raw = doctored(good(t)[1], lambda d: d.update(payload=flip(d["payload"], 40)))
    return open_(tmp, t.root, raw)


@attack("bad_signature")
def signature_bytes_flipped(tmp: Path) -> object:
    t = make_trust()
    raw = doctored(
        good(t)[1], lambda d: d["signatures"][0].update(sig=flip(d["signatures"][0]["sig"]))
    )
    return open_(tmp, t.root, raw)


@attack("bad_signature")
def one_signature_duplicated_to_meet_a_threshold_of_two(tmp: Path) -> object:
    t = make_trust(releases=2, release_threshold=2)
    raw = signed(manifest_for(FILES), t.release[:1])
    return open_(tmp, t.root, doctored(raw, lambda d: d.update(signatures=d["signatures"] * 2)))


@attack("wrong_type")
def a_root_envelope_as_a_manifest(tmp: Path) -> object:
    t = make_trust()
    return open_(tmp, t.root, sign(canonical_json(manifest_for(FILES)), ROOT_TYPE, t.release))


@attack("oversized")
def oversized_envelope(tmp: Path) -> object:
    t = make_trust()
    return open_(tmp, t.root, good(t)[1] + b" " * MAX_ENVELOPE_BYTES)


@attack("oversized")
def oversized_envelope_given_directly(tmp: Path) -> object:
    t = make_trust()
    return verify_manifest(good(t)[1] + b" " * MAX_ENVELOPE_BYTES, t.root, now=NOW)


@attack("malformed")
def signed_payload_that_is_not_a_manifest(tmp: Path) -> object:
    t = make_trust()
    return open_(
        tmp,
        t.root,
        sign(
            b'{"type":"release","kind":"agent"}', "application/vnd.lepton.manifest+json", t.release
        ),
    )


@attack("malformed")
def a_signed_manifest_listing_a_file_twice(tmp: Path) -> object:
    t = make_trust()
    m = manifest_for(FILES)
    twice = msgspec.structs.replace(m, files=[*m.files, m.files[0]])
    return open_(tmp, t.root, signed(twice, t.release))


@attack("malformed")
def a_signed_manifest_listing_a_file_inside_a_file(tmp: Path) -> object:
    t = make_trust()
    files = {**FILES, "config/agent.toml/inner": b"x"}
    return open_(tmp, t.root, signed(manifest_for(files), t.release), files)


# --- files --------------------------------------------------------------------------------


@attack("tampered")
def one_byte_of_a_file_changed(tmp: Path) -> object:
    t = make_trust()
    files = dict(FILES)
    files["config/agent.toml"] = files["config/agent.toml"].replace(b"default", b"DEFAULT")
    return open_(tmp, t.root, good(t)[1], files)


@attack("tampered")
def a_file_truncated(tmp: Path) -> object:
    t = make_trust()
    files = dict(FILES)
    files["systemd/lepton-agent.service"] = files["systemd/lepton-agent.service"][:-3]
    return open_(tmp, t.root, good(t)[1], files)


@attack("unlisted_file")
def an_extra_unlisted_file(tmp: Path) -> object:
    t = make_trust()
    return open_(tmp, t.root, good(t)[1], {**FILES, "systemd/evil.service": b"[Service]\n"})


@attack("missing_file")
def a_listed_file_missing(tmp: Path) -> object:
    t = make_trust()
    files = {p: b for p, b in FILES.items() if not p.startswith("config/")}
    return open_(tmp, t.root, good(t)[1], files)


@attack("tampered")
def a_file_swapped_in_from_another_release(tmp: Path) -> object:
    t = make_trust()
    wheel = "wheels/lepton_fleet-1.2.0-py3-none-any.whl"
    old = {**FILES, wheel: b"WHEEL BYTES " * 50}  # the same length, another release's bytes
    signed(manifest_for(old, version="1.1.0"), t.release)  # a genuine, signed older release
    return open_(tmp, t.root, good(t)[1], {**FILES, wheel: old[wheel]})


@attack("tampered")
def an_older_releases_manifest_with_these_files(tmp: Path) -> object:
    t = make_trust()
    old = {"wheels/lepton_fleet-1.1.0-py3-none-any.whl": b"older", "config/agent.toml": b"x"}
    return open_(tmp, t.root, signed(manifest_for(old, version="1.1.0"), t.release), FILES)


# --- the tar itself -----------------------------------------------------------------------


#: One trust for the tar attacks: each bundle is signed correctly, only the tar is hostile.
ATTACK_TRUST = make_trust()


def members_with(extra: list[Member], *, without: str = "") -> list[Member]:
    """The good bundle's members (manifest first), less ``without``, plus ``extra``."""
    files = [regular(p, b) for p, b in FILES.items() if p != without]
    return [regular(BUNDLE_MANIFEST, good(ATTACK_TRUST)[1]), *files, *extra]


@attack("tampered")
def a_listed_path_as_a_symlink(tmp: Path) -> object:
    hostile = special("config/agent.toml", tarfile.SYMTYPE, "/etc/shadow")
    members = members_with([hostile], without="config/agent.toml")
    return open_members(tmp, ATTACK_TRUST.root, members)


@attack("tampered")
def a_listed_path_as_a_hardlink(tmp: Path) -> object:
    hostile = special("config/agent.toml", tarfile.LNKTYPE, "systemd/lepton-agent.service")
    members = members_with([hostile], without="config/agent.toml")
    return open_members(tmp, ATTACK_TRUST.root, members)


@attack("tampered")
def a_listed_path_as_a_device_node(tmp: Path) -> object:
    hostile = special("config/agent.toml", tarfile.CHRTYPE)
    members = members_with([hostile], without="config/agent.toml")
    return open_members(tmp, ATTACK_TRUST.root, members)


@attack("unlisted_file")
def an_unlisted_symlink(tmp: Path) -> object:
    return open_members(
        tmp, ATTACK_TRUST.root, members_with([special("wheels/x", tarfile.SYMTYPE, "/")])
    )


@attack("unlisted_file")
def a_dot_dot_member(tmp: Path) -> object:
    return open_members(tmp, ATTACK_TRUST.root, members_with([regular("../escaped", b"x")]))


@attack("unlisted_file")
def an_absolute_member(tmp: Path) -> object:
    return open_members(tmp, ATTACK_TRUST.root, members_with([regular("/tmp/escaped", b"x")]))


@attack("tampered")
def a_file_twice(tmp: Path) -> object:
    return open_members(tmp, ATTACK_TRUST.root, members_with([regular("config/agent.toml", b"x")]))


@attack("malformed")
def manifest_not_first(tmp: Path) -> object:
    raw = good(ATTACK_TRUST)[1]
    members = [regular(p, b) for p, b in FILES.items()] + [regular(BUNDLE_MANIFEST, raw)]
    return open_members(tmp, ATTACK_TRUST.root, members)


@attack("oversized")
def an_endless_extended_header(tmp: Path) -> object:
    huge = tarfile.TarInfo("wheels/x.whl")
    huge.pax_headers = {"comment": "A" * 200_000}
    return open_members(tmp, ATTACK_TRUST.root, members_with([(huge, b"")]))


@attack("malformed")
def not_a_tar(tmp: Path) -> object:
    (tmp / "b.tar").write_bytes(b"\x1f\x8b" + b"\0" * 2000)
    return open_bundle(tmp / "b.tar", tmp / "out", ATTACK_TRUST.root, now=NOW)


# --- the manifest's own rules -------------------------------------------------------------


@attack("expired")
def expired_manifest_freeze(tmp: Path) -> object:
    t = make_trust()
    return open_(tmp, t.root, good(t, expires=NOW - 1)[1])


@attack("floor_above_version")
def floor_above_version(tmp: Path) -> object:
    t = make_trust()
    return open_(tmp, t.root, good(t, version="1.2.0", floor="1.3.0")[1])


# --- device policy ------------------------------------------------------------------------


def policy(**kw: object) -> Callable[[Path], object]:
    def run(tmp: Path) -> object:
        t = make_trust()
        (tmp / "accepted").mkdir()
        m = open_(tmp / "accepted", t.root, good(t)[1])  # version 1.2.0, floor 1.0.0, rpi4
        args = {"kind": "agent", "device_class": "rpi4", "running": "1.1.0", "floor": "1.0.0"}
        args.update(kw)
        return check_policy(m, **args)  # type: ignore[arg-type]

    return run


for _name, _reason, _kw in [
    ("older_version_rollback", "rollback", {"running": "1.3.0"}),
    ("equal_version", "rollback", {"running": "1.2.0"}),
    ("below_the_device_floor", "below_floor", {"running": "1.1.0", "floor": "1.2.1"}),
    ("wrong_device_class", "wrong_class", {"device_class": "rpi5"}),
    ("wrong_kind", "wrong_kind", {"kind": "model"}),
]:
    ATTACKS[_name] = (_reason, policy(**_kw))


# --- roots --------------------------------------------------------------------------------


def rotated(old_version: int = 1, new_version: int = 2, expires: float = NOW + HOUR):
    """An old root and a rotated successor (a new root key), and both keys."""
    t = make_trust(version=old_version)
    new_key = generate_key()
    new = msgspec.structs.replace(
        t.root, version=new_version, expires=int(expires), root_keys=[public_key(new_key)]
    )
    return t, new, new_key


def root_signed(root: Root, keys: list) -> bytes:  # type: ignore[type-arg]
    return sign(canonical_json(root), ROOT_TYPE, keys)


@attack("unknown_key")
def rotation_signed_only_by_the_new_key(tmp: Path) -> object:
    t, new, k = rotated()
    return load_root(root_signed(new, [k]), trusted=t.root, now=NOW)


@attack("unknown_key")
def rotation_signed_only_by_the_old_key(tmp: Path) -> object:
    t, new, _ = rotated()
    return load_root(root_signed(new, t.root_keys), trusted=t.root, now=NOW)


@attack("root_version")
def rotation_that_skips_a_version(tmp: Path) -> object:
    t, new, k = rotated(new_version=3)
    return load_root(root_signed(new, [*t.root_keys, k]), trusted=t.root, now=NOW)


@attack("root_version")
def an_old_root_replayed(tmp: Path) -> object:
    t = make_trust(version=2)
    old = msgspec.structs.replace(t.root, version=1)
    return load_root(root_signed(old, t.root_keys), trusted=t.root, now=NOW)


@attack("root_expired")
def an_expired_root(tmp: Path) -> object:
    t, new, k = rotated(expires=NOW - 1)
    return load_root(root_signed(new, [*t.root_keys, k]), trusted=t.root, now=NOW)


@attack("unknown_key")
def a_first_root_not_signed_by_its_own_keys(tmp: Path) -> object:
    t = make_trust()
    return load_root(root_signed(t.root, [generate_key()]), trusted=None, now=NOW)


@attack("root_version")
def a_root_chain_with_a_gap(tmp: Path) -> object:
    t, new, k = rotated(new_version=3)
    chain = tmp / "trust"
    chain.mkdir()
    (chain / "root.3.json").write_bytes(root_signed(new, [*t.root_keys, k]))
    return apply_root_chain(t.root, chain, now=NOW)


def test_the_matrix_is_complete() -> None:
    assert len(ATTACKS) == 44


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_is_refused(name: str, tmp_path: Path) -> None:
    reason, run = ATTACKS[name]
    with pytest.raises(ReleaseRefused) as info:
        run(tmp_path)
    assert info.value.reason == reason, info.value
    out = tmp_path / "out"
    assert not out.exists() or not any(out.iterdir()), "a refused bundle left files"
    assert not (tmp_path / "escaped").exists()


# --- positive controls --------------------------------------------------------------------


def test_a_good_bundle_is_accepted_and_extracted_exactly(tmp_path: Path) -> None:
    t = make_trust()
    m = open_(tmp_path, t.root, good(t)[1])
    assert m.version == "1.2.0"  # type: ignore[attr-defined]
    got = {
        p.relative_to(tmp_path / "out").as_posix(): p.read_bytes()
        for p in (tmp_path / "out").rglob("*")
        if p.is_file()
    }
    assert got == FILES
    m2, raw = open_bundle_raw(tmp_path / "b.tar", tmp_path / "again", t.root, now=NOW)
    assert m2 == m
    assert raw == read_bundle_manifest(tmp_path / "b.tar")
    check_policy(m, kind="agent", device_class="rpi4", running="1.1.0", floor="1.2.0")  # type: ignore[arg-type]
    check_policy(m, kind="agent", device_class="rpi4", running=None, floor=None)  # type: ignore[arg-type]


def test_a_threshold_of_two_distinct_keys_is_accepted(tmp_path: Path) -> None:
    t = make_trust(releases=2, release_threshold=2)
    assert open_(tmp_path, t.root, signed(manifest_for(FILES), t.release))


def test_class_patterns_match_as_fnmatch(tmp_path: Path) -> None:
    t = make_trust()
    m = open_(tmp_path, t.root, good(t, classes=["jetson-orin-*", "x86_64"])[1])
    for c in ("jetson-orin-nano", "jetson-orin-nx", "x86_64"):
        check_policy(m, kind="agent", device_class=c, running=None, floor=None)  # type: ignore[arg-type]
    with pytest.raises(ReleaseRefused):
        check_policy(m, kind="agent", device_class="jetson-xavier-nx", running=None, floor=None)  # type: ignore[arg-type]


def test_rotation_signed_by_old_and_new_is_accepted(tmp_path: Path) -> None:
    t, new, k = rotated()
    got = load_root(root_signed(new, [*t.root_keys, k]), trusted=t.root, now=NOW)
    assert got.version == 2
    assert got.root_keys == [public_key(k)]
    # The rotated root stands on its own as a device's pinned root.
    assert load_root(root_signed(new, [*t.root_keys, k]), trusted=None, now=NOW) == got


def test_a_chain_walks_through_an_expired_middle_root(tmp_path: Path) -> None:
    t, v2, k2 = rotated(expires=NOW - 10)  # v2 expired while the device slept
    k3 = generate_key()
    v3 = msgspec.structs.replace(v2, version=3, expires=int(NOW + HOUR), root_keys=[public_key(k3)])
    chain = tmp_path / "trust"
    chain.mkdir()
    (chain / "root.1.json").write_bytes(root_signed(t.root, t.root_keys))
    (chain / "root.2.json").write_bytes(root_signed(v2, [*t.root_keys, k2]))
    (chain / "root.3.json").write_bytes(root_signed(v3, [k2, k3]))
    root, raw = apply_root_chain(t.root, chain, now=NOW)
    assert root.version == 3
    assert raw == (chain / "root.3.json").read_bytes()
    assert apply_root_chain(root, chain, now=NOW) == (root, None)


def test_revoking_a_compromised_release_key_through_a_new_root(tmp_path: Path) -> None:
    t = make_trust(releases=2)
    stolen, kept = t.release
    v2 = msgspec.structs.replace(
        t.root,
        version=2,
        release_keys=[public_key(kept)],
        revoked=[public_key(stolen).keyid],
    )
    root = load_root(root_signed(v2, t.root_keys), trusted=t.root, now=NOW)
    with pytest.raises(ReleaseRefused) as info:
        verify_manifest(signed(manifest_for(FILES), [stolen]), root, now=NOW)
    assert info.value.reason == "revoked_key"
    assert verify_manifest(signed(manifest_for(FILES), [kept]), root, now=NOW).version == "1.2.0"


def test_verify_files_refuses_links_and_stray_directories(tmp_path: Path) -> None:
    m = manifest_for(FILES)
    for p, b in FILES.items():
        (tmp_path / p).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / p).write_bytes(b)
    verify_files(m, tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReleaseRefused, match="unlisted_file"):
        verify_files(m, tmp_path)
    (tmp_path / "empty").rmdir()
    target = tmp_path / "config/agent.toml"
    (tmp_path / "elsewhere").write_bytes(target.read_bytes())
    target.unlink()
    target.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ReleaseRefused) as info:
        verify_files(m, tmp_path)
    assert info.value.reason == "unlisted_file"  # the stray copy is found first
    (tmp_path / "elsewhere").unlink()
    with pytest.raises(ReleaseRefused) as info:
        verify_files(m, tmp_path)
    assert info.value.reason == "tampered"
