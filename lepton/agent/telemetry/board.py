"""What board this is and what it can tell about itself: cheap reads of /proc, /sys and /dev.

Nothing here imports anything heavy or blocks for long, so both the daemon (every capacity
sample) and the probe subprocess use it. Every function takes ``root`` so tests can point it
at a fake tree: the device tree and DMI for the model, thermal zones, Raspberry Pi throttle
sources (``vcgencmd``, the firmware's sysfs file, the ``rpi_volt`` hwmon), and the device nodes
of accelerators (Jetson GPU, Coral Edge TPU, Hailo).
"""

from __future__ import annotations

import logging
import math
import os
import platform
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

logger = logging.getLogger(__name__)

#: ``get_throttled`` bits that describe the present (the high bits say "has occurred since
#: boot"): under-voltage, ARM frequency capped, throttled, soft temperature limit.
THROTTLE_NOW_MASK: Final = 0xF
VCGENCMD_INTERVAL_S: Final = 30.0
VCGENCMD_TIMEOUT_S: Final = 2.0
_VCGENCMD_MAX_FAILURES: Final = 3

#: Accelerator labels that come from device nodes rather than from a runtime; these can change
#: while the agent runs (a USB Coral plugged in), so the capacity sampler re-checks them.
DEVICE_ACCELERATORS: Final = frozenset({"jetson", "edgetpu", "hailo"})
# Coral USB accelerator: (vendor, product) before and after its firmware is loaded.
_CORAL_USB_IDS: Final = frozenset({("1a6e", "089a"), ("18d1", "9302")})
_JETSON_GPU_NODES: Final = ("dev/nvmap", "dev/nvhost-ctrl-gpu", "dev/nvgpu")
#: Jetson GPU utilisation (per mille), by JetPack release and module.
JETSON_GPU_LOAD: Final = (
    "sys/devices/gpu.0/load",
    "sys/devices/platform/gpu.0/load",
    "sys/devices/platform/bus@0/17000000.gpu/load",
    "sys/devices/platform/17000000.ga10b/load",
    "sys/devices/platform/17000000.gv11b/load",
    "sys/devices/platform/bus@0/17000000.gv11b/load",
)

# Thermal zones that describe the SoC/CPU/GPU die, and zones that never do (Jetson's PMIC-Die
# reads a constant 100 C on some boards; board and battery sensors lag the die).
CPU_ZONE_RE: Final = re.compile(r"cpu|soc|gpu|tj|x86_pkg|package|core|cluster|cv\d", re.I)
NOT_CPU_ZONE_RE: Final = re.compile(
    r"pmic|board|diode|batt|charger|wifi|wlan|iwl|nvme|pch|ambient|skin|modem|usb|ddr|therm_pa",
    re.I,
)
_THROTTLE_RE: Final = re.compile(r"^\s*(?:throttled=)?(?:0x)?([0-9a-fA-F]{1,16})\s*$")


# ---------------------------------------------------------------- pure helpers


def parse_throttled(text: str) -> int | None:
    """Bits from ``vcgencmd get_throttled`` (``throttled=0x50005``) or sysfs (``50005``)."""
    match = _THROTTLE_RE.match(text)
    return int(match.group(1), 16) if match else None


def throttled_now(flags: int) -> bool:
    """True when any present-tense bit is set (under-voltage, capped, throttled, soft limit)."""
    return bool(flags & THROTTLE_NOW_MASK)


_RPI_MODELS: Final = (
    (r"compute module (\d+)", "rpi{}"),
    (r"raspberry pi (\d)00\b", "rpi{}"),  # Pi 400 / Pi 500 keyboards
    (r"zero 2", "rpi-zero2"),
    (r"zero", "rpi-zero"),
    (r"raspberry pi (\d+)", "rpi{}"),
)
_RPI_SOCS: Final = ((b"brcm,bcm2712", "rpi5"), (b"brcm,bcm2711", "rpi4"), (b"brcm,bcm2837", "rpi3"))
_JETSON_MODELS: Final = (
    (r"orin nano", "jetson-orin-nano"),
    (r"orin nx", "jetson-orin-nx"),
    (r"agx orin|orin agx", "jetson-agx-orin"),
    (r"xavier nx", "jetson-xavier-nx"),
    (r"agx xavier|jetson-agx", "jetson-agx-xavier"),
    (r"tx2", "jetson-tx2"),
    (r"\bnano\b", "jetson-nano"),
)
_JETSON_SOCS: Final = (
    (b"nvidia,tegra234", "jetson-orin"),
    (b"nvidia,tegra194", "jetson-xavier"),
    (b"nvidia,tegra186", "jetson-tx2"),
    (b"nvidia,tegra210", "jetson-nano"),
)


def _match_class(
    model: str,
    compatible: bytes,
    models: tuple[tuple[str, str], ...],
    socs: tuple[tuple[bytes, str], ...],
    default: str,
) -> str:
    for pattern, label in models:
        if found := re.search(pattern, model):
            return label.format(*found.groups())
    return next((label for soc, label in socs if soc in compatible), default)


def device_class_for(model: str, compatible: bytes = b"", machine: str = "") -> str:
    """A short class label (``rpi5``, ``jetson-orin-nano``, ``x86_64``...) for a device model.

    ``compatible`` is the raw ``/proc/device-tree/compatible`` (NUL-separated strings); it
    decides when the model string alone does not.
    """
    m = model.lower()
    if m.startswith("raspberry pi") or b"raspberrypi," in compatible:
        return _match_class(m, compatible, _RPI_MODELS, _RPI_SOCS, "rpi")
    if "jetson" in m or b"nvidia,tegra" in compatible:
        return _match_class(m, compatible, _JETSON_MODELS, _JETSON_SOCS, "jetson")
    arch = (machine or platform.machine()).lower()
    arch = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}.get(arch, arch)
    return re.sub(r"[^a-z0-9._:/-]", "-", arch)[:64] or "unknown"


# ---------------------------------------------------------------- sysfs readers


def read_text(path: Path, limit: int = 4096) -> str | None:
    try:
        with path.open("rb") as fh:
            return fh.read(limit).decode(errors="replace").replace("\x00", "").strip()
    except OSError:
        return None


def read_raw(path: Path, limit: int = 4096) -> bytes | None:
    try:
        with path.open("rb") as fh:
            return fh.read(limit)
    except OSError:
        return None


def read_int(path: Path) -> int | None:
    text = read_text(path, 64)
    try:
        return int(text) if text else None
    except ValueError:
        return None


def numeric_suffix(path: Path) -> int:
    digits = re.sub(r"\D", "", path.name)
    return int(digits) if digits else -1


def read_device_model(root: Path = Path("/")) -> str:
    """The board's model string: device tree, then DMI, then the machine architecture."""
    for rel in (
        "proc/device-tree/model",
        "sys/firmware/devicetree/base/model",
        "sys/class/dmi/id/product_name",
    ):
        text = read_text(root / rel, 512)
        if text:
            return text[:256]
    return platform.machine()


@dataclass(frozen=True, slots=True)
class Zone:
    """A thermal zone whose ``temp`` file the sampler reads."""

    kind: str
    temp: Path
    trips_c: tuple[float, ...]  # passive/hot trip points: the kernel throttles above them


def thermal_zones(root: Path) -> list[Zone]:
    """CPU-like thermal zones; any non-excluded zone (``acpitz``) when none looks like a CPU."""
    cpu_like: list[Zone] = []
    others: list[Zone] = []
    for zone in sorted((root / "sys/class/thermal").glob("thermal_zone*"), key=numeric_suffix):
        kind = read_text(zone / "type", 128) or zone.name
        if NOT_CPU_ZONE_RE.search(kind):
            continue
        trips: list[float] = []
        for trip_type in sorted(zone.glob("trip_point_*_type")):
            if read_text(trip_type, 64) in {"passive", "hot"}:
                milli = read_int(trip_type.with_name(trip_type.name.replace("_type", "_temp")))
                if milli is not None and milli > 0:
                    trips.append(milli / 1000.0)
        entry = Zone(kind, zone / "temp", tuple(sorted(trips)))
        (cpu_like if CPU_ZONE_RE.search(kind) else others).append(entry)
    return cpu_like or others


def rpi_throttle_file(root: Path) -> Path | None:
    for candidate in (
        root / "sys/devices/platform/soc/soc:firmware/get_throttled",
        *sorted((root / "sys/devices/platform").glob("soc*/*firmware/get_throttled")),
    ):
        if candidate.is_file():
            return candidate
    return None


def rpi_undervolt_file(root: Path) -> Path | None:
    for hwmon in sorted((root / "sys/class/hwmon").glob("hwmon*")):
        if read_text(hwmon / "name", 64) == "rpi_volt" and (hwmon / "in0_lcrit_alarm").is_file():
            return hwmon / "in0_lcrit_alarm"
    return None


def vcgencmd_path(root: Path) -> str | None:
    candidates = [root / "usr/bin/vcgencmd", root / "opt/vc/bin/vcgencmd"]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("vcgencmd") if root == Path("/") else None


class VcgencmdReader:
    """``vcgencmd get_throttled``, refreshed at most every ``interval`` s without blocking.

    :meth:`poll` starts the command when the last answer is older than ``interval`` and
    collects it on a later call, killing it past ``timeout``. After three failures in a row
    (``/dev/vcio`` hidden by the service sandbox, say) it gives up and logs once.
    """

    def __init__(
        self,
        path: str,
        *,
        interval: float = VCGENCMD_INTERVAL_S,
        timeout: float = VCGENCMD_TIMEOUT_S,
    ) -> None:
        self.path = path
        self.interval = interval
        self.timeout = timeout
        self.flags: int | None = None
        self.updated_at: float | None = None
        self.failures = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._started = -math.inf

    @property
    def disabled(self) -> bool:
        return self.failures >= _VCGENCMD_MAX_FAILURES

    def read_now(self) -> int | None:
        """Run the command and wait for it (at most ``timeout``); for start-up, not for sampling."""
        self._started = time.monotonic()
        try:
            done = subprocess.run(
                [self.path, "get_throttled"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=self.timeout,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            self._failed(str(exc))
            return self.flags
        self._finish(done.returncode, done.stdout, done.stderr, time.monotonic())
        return self.flags

    def poll(self, now: float | None = None) -> int | None:
        """The latest flags (None when never read or stale), starting a refresh when due."""
        now = time.monotonic() if now is None else now
        proc = self._proc
        if proc is not None:
            if proc.poll() is not None:
                self._proc = None
                out, err = proc.communicate()
                self._finish(proc.returncode, out, err, now)
            elif now - self._started > self.timeout:
                self._proc = None
                proc.kill()
                proc.communicate()
                self._failed(f"no answer within {self.timeout:g} s")
        elif not self.disabled and now - self._started >= self.interval:
            self._started = now
            try:
                self._proc = subprocess.Popen(
                    [self.path, "get_throttled"],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                )
            except OSError as exc:
                self._failed(str(exc))
        if self.updated_at is None or now - self.updated_at > 3 * self.interval:
            return None
        return self.flags

    def close(self) -> None:
        """Kill a command still running (no zombie is left behind)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()

    def _finish(self, returncode: int, out: bytes, err: bytes, now: float) -> None:
        flags = parse_throttled(out.decode(errors="replace")) if returncode == 0 else None
        if flags is None:
            reason = (err or out).decode(errors="replace").strip()[:200]
            self._failed(f"exit status {returncode}: {reason or 'no output'}")
            return
        self.flags = flags
        self.updated_at = now
        self.failures = 0

    def _failed(self, reason: str) -> None:
        self.failures += 1
        if self.failures == _VCGENCMD_MAX_FAILURES:
            logger.warning(
                "vcgencmd get_throttled failed %d times, no longer used (%s); falling back to "
                "sysfs. Under systemd, see deploy/systemd/drop-ins/raspberry-pi.conf",
                self.failures,
                reason,
            )
        else:
            logger.debug("vcgencmd get_throttled failed: %s", reason)


# ---------------------------------------------------------------- accelerators


def is_tegra(root: Path = Path("/")) -> bool:
    """True on an NVIDIA Jetson (Tegra SoC), whether or not its GPU is visible to this process."""
    if (root / "etc/nv_tegra_release").exists():
        return True
    compatible = read_raw(root / "proc/device-tree/compatible") or b""
    return b"nvidia,tegra" in compatible


def device_accelerators(root: Path = Path("/")) -> tuple[tuple[str, ...], dict[str, Any]]:
    """Accelerators found through device nodes and sysfs, with the evidence for each.

    A label is reported only when this process can see the device node it would open: under
    the systemd unit's ``PrivateDevices=yes`` the nodes are hidden and the label is absent
    (``details`` then says the hardware exists but is not reachable).
    """
    found: set[str] = set()
    details: dict[str, Any] = {}
    if is_tegra(root):
        nodes = [n for n in _JETSON_GPU_NODES if (root / n).exists()]
        details["tegra"] = {"gpu_nodes": nodes}
        if nodes:
            found.add("jetson")
    if (root / "dev/apex_0").exists():
        found.add("edgetpu")
        details["edgetpu"] = "pcie:/dev/apex_0"
    elif (root / "dev/bus/usb").is_dir():
        for dev in sorted((root / "sys/bus/usb/devices").glob("*")):
            vendor = (read_raw(dev / "idVendor") or b"").decode(errors="replace").strip()
            product = (read_raw(dev / "idProduct") or b"").decode(errors="replace").strip()
            if (vendor, product) in _CORAL_USB_IDS:
                found.add("edgetpu")
                details["edgetpu"] = f"usb:{vendor}:{product}"
                break
    hailo = sorted(p.name for p in (root / "dev").glob("hailo[0-9]*"))
    if hailo:
        found.add("hailo")
        details["hailo"] = hailo
    return tuple(sorted(found)), details
