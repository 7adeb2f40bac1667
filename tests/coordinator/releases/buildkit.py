"""A small source tree, wheelhouse and key directory for builder and CLI tests.

The wheels are real (zip archives with the metadata pip reads to resolve dependencies), so
``pip download --no-index`` resolves them exactly as it would a real wheelhouse.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

from lepton.coordinator.releases.keys import KeyStore


def make_wheel(directory: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> Path:
    dist = f"{name}-{version}.dist-info"
    path = directory / f"{name}-{version}-py3-none-any.whl"
    meta = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    meta += [f"Requires-Dist: {r}" for r in requires]
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}/__init__.py", f"VERSION = {version!r}\n")
        z.writestr(f"{dist}/METADATA", "\n".join(meta) + "\n")
        z.writestr(
            f"{dist}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        z.writestr(f"{dist}/RECORD", "")
    return path


DEFINITION = """
name = "tinyagent"
device_classes = ["rpi4", "jetson-orin-*"]
platforms = ["manylinux_2_35_aarch64", "linux_aarch64"]
requirement = "tinyapp=={version}"
config = "deploy/agent.toml"
units = ["deploy/systemd/lepton-agent.service"]
dropins = ["deploy/systemd/drop-ins/jetson.conf"]
security_floor = "1.0.0"
expires_days = 30
notes = "test image"

[self_test]
model = "models/m.onnx"
inputs = "models/x.npz"
expected = "models/y.npz"
min_agreement = 0.9
"""


@dataclass
class Kit:
    definition: Path
    wheelhouse: Path
    keys: Path
    out: Path

    @property
    def release_key(self) -> Path:
        return next(self.keys.glob("release-*.key"))

    @property
    def root_json(self) -> Path:
        return self.keys / "root.json"


def make_kit(tmp: Path) -> Kit:
    src = tmp / "src"
    for path, text in {
        "firmware_images/tiny-arm64.toml": DEFINITION,
        "deploy/agent.toml": '[device]\nfleet = "default"\n',
        "deploy/systemd/lepton-agent.service": "[Service]\nExecStart=/bin/true\n",
        "deploy/systemd/drop-ins/jetson.conf": "[Service]\nPrivateDevices=no\n",
        "models/m.onnx": "not really onnx",
        "models/x.npz": "inputs",
        "models/y.npz": "labels",
    }.items():
        (src / path).parent.mkdir(parents=True, exist_ok=True)
        (src / path).write_text(text)
    house = tmp / "wheelhouse"
    house.mkdir()
    make_wheel(house, "tinyapp", "1.2.0", ("tinydep>=1.0",))
    make_wheel(house, "tinyapp", "1.1.0", ("tinydep>=1.0",))
    make_wheel(house, "tinydep", "1.0")
    make_wheel(house, "unrelated", "9.9")
    keys = tmp / "keys"
    KeyStore(keys).init()
    return Kit(
        definition=src / "firmware_images/tiny-arm64.toml",
        wheelhouse=house,
        keys=keys,
        out=tmp / "out",
    )
