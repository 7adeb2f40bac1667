"""Releases for the demo and the rollout benchmark: a trust root and a release key, signed
agent bundles built from a tiny definition, and the coordinator's release and rollout API.

:class:`ReleaseKit` does what an operator's CI does (``lepton release keys init``,
``lepton release build``) with the same library calls, in a work directory: the bundles it
builds are real signed bundles that the coordinator verifies on publish and every simulated
device verifies again before it "installs" one (:mod:`lepton.sim.updater`). Their wheels are
placeholders: simulated devices build no virtual environment. A bundle built with
``crashes=True`` carries :data:`~lepton.sim.updater.CRASH_MARKER`, which makes every
simulated device fail its health trial (the demo's broken release).

:class:`RolloutClient` publishes bundles and creates and follows rollouts over HTTP, as
``lepton release publish`` and ``lepton rollout ...`` do.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from lepton.common.errors import LeptonError
from lepton.common.signing import (
    canonical_json,
    generate_key,
    load_private_key,
    public_key,
    save_private_key,
    sign,
)
from lepton.protocol import routes
from lepton.protocol.releases import ROOT_TYPE, Root
from lepton.sim.updater import CRASH_MARKER

ENDED = frozenset({"completed", "aborted", "failed"})
RELEASE_NAME = "lepton-agent"


def _urlsafe_sha256(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


class ReleaseError(LeptonError):
    """The coordinator refused a release or rollout call; ``reason`` as it said."""

    def __init__(self, status: int, reason: str, detail: str) -> None:
        self.status, self.reason, self.detail = status, reason, detail
        super().__init__(f"{status} {reason}: {detail}")


@dataclass(frozen=True, slots=True, kw_only=True)
class ReleaseKit:
    """A root key, a release key and root.json in ``directory``, and a definition to build
    signed agent bundles from."""

    directory: Path
    name: str = RELEASE_NAME

    @property
    def root_file(self) -> Path:
        return self.directory / "root.json"

    @property
    def release_key_file(self) -> Path:
        return self.directory / "release.key"

    @classmethod
    def create(cls, directory: Path, *, days: int = 30) -> ReleaseKit:
        """New keys and a root (version 1) naming the release key, valid ``days``."""
        directory.mkdir(parents=True, exist_ok=True)
        kit = cls(directory=directory)
        root_key, release_key = generate_key(), generate_key()
        save_private_key(directory / "root.key", root_key)
        save_private_key(kit.release_key_file, release_key)
        root = Root(
            version=1,
            expires=int(time.time()) + days * 86400,
            root_keys=[public_key(root_key)],
            release_keys=[public_key(release_key)],
        )
        kit.root_file.write_bytes(sign(canonical_json(root), ROOT_TYPE, [root_key]))
        return kit

    def _source(self, crashes: bool) -> Path:
        """A source tree with the image definition (and the crash marker)."""
        src = self.directory / ("src-crashes" if crashes else "src")
        (src / "firmware_images").mkdir(parents=True, exist_ok=True)
        models = []
        if crashes:
            (src / "sim").mkdir(exist_ok=True)
            (src / "sim" / CRASH_MARKER).write_text("this build crashes on start\n")
            models.append(f"sim/{CRASH_MARKER}")
        (src / "sim").mkdir(exist_ok=True)
        (src / "sim" / "agent.toml").write_text("# the simulated image's agent configuration\n")
        notes = "simulated image" + (" (crashes on start)" if crashes else "")
        # JSON strings are valid TOML basic strings (no TOML writer in the standard library).
        lines = [
            f"name = {json.dumps(self.name)}",
            'device_classes = ["*"]',
            'platforms = ["any"]',
            'requirement = "lepton-fleet=={version}"',
            'config = "sim/agent.toml"',
            f"models = {json.dumps(models)}",
            "expires_days = 30",
            f"notes = {json.dumps(notes)}",
        ]
        path = src / "firmware_images" / "sim-agent.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def _wheelhouse(self, version: str) -> Path:
        """A placeholder ``lepton-fleet`` wheel of this version, valid enough for pip to
        resolve the image's requirement (simulated devices install nothing)."""
        house = self.directory / "wheels" / version
        house.mkdir(parents=True, exist_ok=True)
        wheel = house / f"lepton_fleet-{version}-py3-none-any.whl"
        if wheel.exists():
            return house
        info = f"lepton_fleet-{version}.dist-info"
        files = {
            "lepton_fleet_placeholder.txt": f"simulated agent image {version}\n",
            f"{info}/METADATA": (
                f"Metadata-Version: 2.1\nName: lepton-fleet\nVersion: {version}\n"
            ),
            f"{info}/WHEEL": (
                "Wheel-Version: 1.0\nGenerator: lepton-demo\nRoot-Is-Purelib: true\n"
                "Tag: py3-none-any\n"
            ),
        }
        record = [
            f"{name},sha256={_urlsafe_sha256(text.encode())},{len(text.encode())}"
            for name, text in files.items()
        ]
        files[f"{info}/RECORD"] = "\n".join([*record, f"{info}/RECORD,,"]) + "\n"
        with zipfile.ZipFile(wheel, "w") as zf:
            for name, text in files.items():
                zf.writestr(name, text)
        return house

    def build(self, version: str, *, out: Path, crashes: bool = False) -> Path:
        """A signed bundle of ``version`` in ``out``; its path."""
        from lepton.coordinator.releases.builder import build_bundle

        out.mkdir(parents=True, exist_ok=True)
        return build_bundle(
            self._source(crashes),
            version=version,
            wheelhouse=self._wheelhouse(version),
            out_dir=out,
            keys=[load_private_key(self.release_key_file)],
        )


class RolloutClient:
    """The coordinator's release and rollout routes, over an authenticated client."""

    def __init__(self, api: httpx.Client) -> None:
        self.api = api

    def _check(self, r: httpx.Response) -> Any:
        if r.status_code >= 400:
            try:
                body = r.json()
            except ValueError:
                body = {"detail": r.text[:200]}
            raise ReleaseError(r.status_code, str(body.get("reason", "")), str(body.get("detail")))
        return r.json()

    def publish(self, bundle: Path) -> list[dict[str, Any]]:
        """Upload a bundle (``POST /v1/releases``); its release records."""
        r = self.api.post(
            routes.RELEASES,
            content=bundle.read_bytes(),
            headers={"Content-Type": "application/x-tar"},
        )
        body = self._check(r)
        return list(body.get("releases", body) if isinstance(body, dict) else body)

    def create(
        self, name: str, version: str, *, phases: Sequence[dict[str, Any]], **plan: Any
    ) -> str:
        """Create an agent rollout (``POST /v1/rollouts``); its id."""
        body = {"kind": "agent", "name": name, "version": version, "phases": list(phases), **plan}
        return str(self._check(self.api.post(routes.ROLLOUTS, json=body))["id"])

    def status(self, rollout_id: str, *, limit: int = 100) -> dict[str, Any]:
        """The rollout, its per-state ``counts`` and its first ``limit`` devices in rollout
        order (``devices``)."""
        r = self.api.get(routes.ROLLOUT.format(rollout_id=rollout_id), params={"limit": limit})
        return dict(self._check(r))

    def act(self, rollout_id: str, action: str, **body: Any) -> dict[str, Any]:
        """``approve``, ``pause``, ``resume`` or ``abort``."""
        route = routes.ROLLOUT_ACTION.format(rollout_id=rollout_id, action=action)
        return dict(self._check(self.api.post(route, json=body)))

    def wait(
        self,
        rollout_id: str,
        timeout: float,
        *,
        check: Callable[[], None] = lambda: None,
        on_status: Callable[[dict[str, Any]], None] = lambda _s: None,
        until: frozenset[str] = ENDED,
    ) -> dict[str, Any]:
        """Poll the rollout until its state is in ``until``; its last status."""
        deadline = time.monotonic() + timeout
        while True:
            check()
            try:
                status = self.status(rollout_id)
            except ReleaseError as exc:
                # 503: the API is at its concurrency limit (a whole fleet downloading at
                # once); a poll waits its turn like the devices' own retries do.
                if exc.status != 503 or time.monotonic() > deadline:
                    raise
                time.sleep(1.0)
                continue
            on_status(status)
            if status["state"] in until:
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"rollout {rollout_id} still {status['state']} after {timeout:g}s"
                )
            time.sleep(0.5)

    @staticmethod
    def count(status: dict[str, Any], *states: str) -> int:
        """Devices of the rollout in any of ``states`` (from its per-state counts)."""
        counts = status.get("counts") or {}
        return sum(int(counts.get(s, 0)) for s in states)

    @staticmethod
    def touched(status: dict[str, Any]) -> int:
        """Devices the rollout sent the release to (all but pending and skipped ones)."""
        counts = status.get("counts") or {}
        return sum(int(n) for s, n in counts.items() if s not in ("pending", "skipped"))


def fleet_versions(api: httpx.Client) -> dict[str, int]:
    """How many online devices run each agent version (``GET /v1/devices``)."""
    r = api.get(routes.DEVICES, params={"limit": 10_000, "state": "online"})
    r.raise_for_status()
    return dict(Counter(str(d.get("agent_version", "")) for d in r.json()))
