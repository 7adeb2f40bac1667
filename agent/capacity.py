"""Capacity telemetry: what this device can do right now, as a :class:`CapacityReport`.

:class:`CapacitySampler` reads psutil and sysfs. A sample is cheap (well under a few ms): the
only helper process, Raspberry Pi's ``vcgencmd get_throttled``, runs at most every 30 s and is
collected on a later sample instead of being waited for. Device model and class, thermal zones
and throttle sources are found once, at construction.

Readings that go through ``root`` (device tree, DMI, cpufreq, thermal zones, throttle files,
device nodes, ``vcgencmd`` under ``usr/bin``) can be pointed at a fake tree in tests; psutil
readings (CPU load, memory, disk, network, battery) always describe the real machine.

:func:`significant_change` is the pure rule for when a new sample is worth an immediate report.
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import psutil

from agent.probe import DEVICE_ACCELERATORS, ProbeResult, device_accelerators, is_tegra
from protocol.messages import (
    Battery,
    CapacityReport,
    Cpu,
    Disk,
    Memory,
    Network,
    Slots,
    Thermal,
)

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

#: ``get_throttled`` bits that describe the present (the high bits say "has occurred since
#: boot"): under-voltage, ARM frequency capped, throttled, soft temperature limit.
THROTTLE_NOW_MASK: Final = 0xF
VCGENCMD_INTERVAL_S: Final = 30.0
VCGENCMD_TIMEOUT_S: Final = 2.0
_VCGENCMD_MAX_FAILURES: Final = 3
#: Device-node accelerators are re-checked this often (a few stat calls).
ACCELERATOR_RECHECK_S: Final = 30.0

BATTERY_THRESHOLDS: Final = (20.0, 10.0)
TEMPERATURE_THRESHOLDS_C: Final = (70.0, 80.0, 90.0)
#: Falling back below a temperature threshold counts only this far below it, so a sensor
#: dithering around the threshold does not report on every sample.
TEMPERATURE_HYSTERESIS_C: Final = 2.0
MEMORY_CHANGE_FRACTION: Final = 0.20

_NAME_RE: Final = re.compile(r"[A-Za-z0-9._:/-]{1,64}")  # protocol Name; used with fullmatch
_MAX_COUNT: Final = 2**62
# Thermal zones that describe the SoC/CPU/GPU die, and zones that never do (Jetson's PMIC-Die
# reads a constant 100 C on some boards; board and battery sensors lag the die).
_CPU_ZONE_RE: Final = re.compile(r"cpu|soc|gpu|tj|x86_pkg|package|core|cluster|cv\d", re.I)
_NOT_CPU_ZONE_RE: Final = re.compile(
    r"pmic|board|diode|batt|charger|wifi|wlan|iwl|nvme|pch|ambient|skin|modem|usb|ddr|therm_pa",
    re.I,
)
_THROTTLE_RE: Final = re.compile(r"^\s*(?:throttled=)?(?:0x)?([0-9a-fA-F]{1,16})\s*$")
_JETSON_GPU_LOAD: Final = (
    "sys/devices/gpu.0/load",
    "sys/devices/platform/gpu.0/load",
    "sys/devices/platform/bus@0/17000000.gpu/load",
    "sys/devices/platform/17000000.ga10b/load",
    "sys/devices/platform/17000000.gv11b/load",
    "sys/devices/platform/bus@0/17000000.gv11b/load",
)


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


def _read_text(path: Path, limit: int = 4096) -> str | None:
    try:
        with path.open("rb") as fh:
            return fh.read(limit).decode(errors="replace").replace("\x00", "").strip()
    except OSError:
        return None


def _read_raw(path: Path, limit: int = 4096) -> bytes | None:
    try:
        with path.open("rb") as fh:
            return fh.read(limit)
    except OSError:
        return None


def _read_int(path: Path) -> int | None:
    text = _read_text(path, 64)
    try:
        return int(text) if text else None
    except ValueError:
        return None


def _numeric_suffix(path: Path) -> int:
    digits = re.sub(r"\D", "", path.name)
    return int(digits) if digits else -1


def read_device_model(root: Path = Path("/")) -> str:
    """The board's model string: device tree, then DMI, then the machine architecture."""
    for rel in (
        "proc/device-tree/model",
        "sys/firmware/devicetree/base/model",
        "sys/class/dmi/id/product_name",
    ):
        text = _read_text(root / rel, 512)
        if text:
            return text[:256]
    return platform.machine()


@dataclass(frozen=True, slots=True)
class _Zone:
    kind: str
    temp: Path
    trips_c: tuple[float, ...]  # passive/hot trip points: the kernel throttles above them


def _thermal_zones(root: Path) -> list[_Zone]:
    """CPU-like thermal zones; any non-excluded zone (``acpitz``) when none looks like a CPU."""
    cpu_like: list[_Zone] = []
    others: list[_Zone] = []
    for zone in sorted((root / "sys/class/thermal").glob("thermal_zone*"), key=_numeric_suffix):
        kind = _read_text(zone / "type", 128) or zone.name
        if _NOT_CPU_ZONE_RE.search(kind):
            continue
        trips: list[float] = []
        for trip_type in sorted(zone.glob("trip_point_*_type")):
            if _read_text(trip_type, 64) in {"passive", "hot"}:
                milli = _read_int(trip_type.with_name(trip_type.name.replace("_type", "_temp")))
                if milli is not None and milli > 0:
                    trips.append(milli / 1000.0)
        entry = _Zone(kind, zone / "temp", tuple(sorted(trips)))
        (cpu_like if _CPU_ZONE_RE.search(kind) else others).append(entry)
    return cpu_like or others


def _rpi_throttle_file(root: Path) -> Path | None:
    for candidate in (
        root / "sys/devices/platform/soc/soc:firmware/get_throttled",
        *sorted((root / "sys/devices/platform").glob("soc*/*firmware/get_throttled")),
    ):
        if candidate.is_file():
            return candidate
    return None


def _rpi_undervolt_file(root: Path) -> Path | None:
    for hwmon in sorted((root / "sys/class/hwmon").glob("hwmon*")):
        if _read_text(hwmon / "name", 64) == "rpi_volt" and (hwmon / "in0_lcrit_alarm").is_file():
            return hwmon / "in0_lcrit_alarm"
    return None


def _vcgencmd_path(root: Path) -> str | None:
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


# ---------------------------------------------------------------- the sampler


class CapacitySampler:
    """Builds :class:`CapacityReport` values for this device.

    ``device_class`` overrides the class derived from the board's model; ``tags`` are passed
    through. Call :meth:`close` at shutdown (it stops a ``vcgencmd`` still running).
    Construction may block for up to two seconds, once, for the first throttle reading.
    """

    def __init__(
        self,
        state_dir: Path,
        probe: ProbeResult | None,
        device_class: str | None,
        tags: tuple[str, ...],
        root: Path = Path("/"),
    ) -> None:
        if device_class is not None and not _NAME_RE.fullmatch(device_class):
            raise ValueError(f"invalid device class {device_class!r}")
        if len(tags) > 64 or any(not _NAME_RE.fullmatch(t) for t in tags):
            raise ValueError(f"invalid tags {tags!r}: at most 64 of [A-Za-z0-9._:/-]{{1,64}}")
        self.state_dir = state_dir
        self._probe: ProbeResult | None = None
        self._static_accelerators: frozenset[str] = frozenset()
        self.probe = probe
        self.tags = tags
        self.root = root
        self._live_root = root == Path("/")
        self.device_model = read_device_model(root)
        compatible = _read_raw(root / "proc/device-tree/compatible") or b""
        self.device_class = device_class or device_class_for(self.device_model, compatible)
        self.is_tegra = is_tegra(root)
        self._zones = _thermal_zones(root)
        self._cpufreq = sorted(
            (root / "sys/devices/system/cpu").glob("cpu[0-9]*/cpufreq/scaling_cur_freq"),
            key=lambda p: _numeric_suffix(p.parent.parent),
        )
        self._throttle_file = _rpi_throttle_file(root)
        self._undervolt_file = _rpi_undervolt_file(root)
        self._gpu_load_file = (
            next((root / rel for rel in _JETSON_GPU_LOAD if (root / rel).is_file()), None)
            if self.is_tegra
            else None
        )
        vcgencmd = _vcgencmd_path(root)
        self.vcgencmd = VcgencmdReader(vcgencmd) if vcgencmd else None
        if self.vcgencmd is not None:
            self.vcgencmd.read_now()
        self._device_accelerators: tuple[str, ...] = ()
        self._accelerators_at = -math.inf
        self._net_prev: tuple[float, int, int] | None = None
        self._warned: set[str] = set()
        self.gpu_load_percent: float | None = None
        psutil.cpu_percent(interval=None)  # the first call only sets the reference point

    @property
    def probe(self) -> ProbeResult | None:
        """The probe whose runtimes, accelerators and figures the reports carry."""
        return self._probe

    @probe.setter
    def probe(self, probe: ProbeResult | None) -> None:
        # The probe finishes after the agent started; reports pick it up from then on.
        self._probe = probe
        self._static_accelerators = frozenset(
            a for a in (probe.accelerators if probe else ()) if a not in DEVICE_ACCELERATORS
        )

    def close(self) -> None:
        """Release helper processes."""
        if self.vcgencmd is not None:
            self.vcgencmd.close()

    def sample(
        self,
        *,
        slots: Slots,
        outbox_pending: int,
        counters: Mapping[str, int],
        interval_s: float,
    ) -> CapacityReport:
        """A report of this moment. Values are clamped to what the wire schema accepts."""
        if not 0.0 < interval_s <= 86_400.0:
            raise ValueError(f"interval_s must be in (0, 86400], got {interval_s}")
        now = time.monotonic()
        probe = self.probe
        return CapacityReport(
            device_model=self.device_model,
            device_class=self.device_class,
            cpu=self._cpu(),
            memory=self._memory(),
            disk=self._guard("disk", self._disk, None),
            network=self._guard("network", lambda: self._network(now), None),
            thermal=self._thermal(now),
            battery=self._guard("battery", self._battery, None),
            accelerators=sorted({"cpu", *self._static_accelerators, *self._accelerators(now)}),
            runtimes=sorted(probe.runtimes) if probe else [],
            bench=probe.bench if probe else None,
            slots=slots,
            outbox_pending=min(max(0, int(outbox_pending)), _MAX_COUNT),
            interval_s=interval_s,
            uptime_s=max(0.0, time.time() - psutil.boot_time()),
            counters=self._counters(counters),
            tags=list(self.tags),
        )

    # ------------------------------------------------------------ parts

    def _guard(self, what: str, read: Callable[[], _T], default: _T) -> _T:
        try:
            return read()
        except (OSError, RuntimeError, ValueError, AttributeError) as exc:
            self._warn_once(what, f"capacity: reading {what} failed: {exc}")
            return default

    def _warn_once(self, what: str, message: str) -> None:
        if what not in self._warned:
            self._warned.add(what)
            logger.warning("%s", message)

    def _cpu(self) -> Cpu:
        percent = psutil.cpu_percent(interval=None)
        freqs: list[float] = []
        for path in self._cpufreq:
            khz = _read_int(path)
            if khz is not None and khz >= 0:
                freqs.append(round(khz / 1000.0, 1))
        if not freqs and self._live_root:
            per_cpu: list[Any] = self._guard(
                "cpu frequency", lambda: psutil.cpu_freq(percpu=True), []
            )
            freqs = [round(max(0.0, f.current), 1) for f in per_cpu or []]
        return Cpu(
            count=max(1, psutil.cpu_count(logical=True) or 1),
            percent=min(100.0, max(0.0, percent)),
            load1=max(0.0, self._guard("load average", lambda: os.getloadavg()[0], 0.0)),
            freq_mhz=freqs[:4096],
            arch=platform.machine()[:256],
        )

    def _memory(self) -> Memory:
        vm = psutil.virtual_memory()
        return Memory(total=int(vm.total), available=int(vm.available))

    def _disk(self) -> Disk:
        path = self.state_dir
        while not path.exists() and path != path.parent:
            path = path.parent
        usage = psutil.disk_usage(str(path))
        return Disk(total=int(usage.total), free=int(usage.free))

    def _network(self, now: float) -> Network:
        per_nic = psutil.net_io_counters(pernic=True)
        sent = sum(c.bytes_sent for nic, c in per_nic.items() if nic != "lo")
        recv = sum(c.bytes_recv for nic, c in per_nic.items() if nic != "lo")
        tx_rate = rx_rate = None
        prev, self._net_prev = self._net_prev, (now, sent, recv)
        if prev is not None:
            elapsed = now - prev[0]
            # Counters go backwards when an interface disappears; no rate then.
            if elapsed > 0 and sent >= prev[1] and recv >= prev[2]:
                tx_rate = (sent - prev[1]) / elapsed
                rx_rate = (recv - prev[2]) / elapsed
        return Network(
            bytes_sent=min(sent, _MAX_COUNT),
            bytes_recv=min(recv, _MAX_COUNT),
            tx_rate=tx_rate,
            rx_rate=rx_rate,
        )

    def _temperature(self) -> tuple[float | None, bool, str]:
        """(max die temperature, above a kernel throttle trip point, zone type)."""
        best: float | None = None
        kind = ""
        tripped = False
        for zone in self._zones:
            milli = _read_int(zone.temp)
            if milli is None:
                continue
            celsius = milli / 1000.0
            if not -100.0 <= celsius <= 300.0:
                continue
            if zone.trips_c and celsius >= zone.trips_c[0]:
                tripped = True
            if best is None or celsius > best:
                best, kind = celsius, zone.kind
        if best is None and self._live_root:
            # No thermal zones (hwmon-only x86 boards, macOS): psutil's sensors, CPU chips
            # (coretemp, k10temp, cpu_thermal...) first, any other non-excluded chip otherwise.
            sensors: dict[str, list[Any]] = (
                self._guard("temperature", psutil.sensors_temperatures, {}) or {}
            )
            chips = [c for c in sensors if not _NOT_CPU_ZONE_RE.search(c)]
            cpu_chips = [c for c in chips if _CPU_ZONE_RE.search(c) or c.startswith("k10")]
            for chip in cpu_chips or chips:
                for entry in sensors[chip]:
                    current = float(entry.current)
                    if -100.0 <= current <= 300.0 and (best is None or current > best):
                        best, kind = current, chip
        return best, tripped, kind

    def _throttle_flags(self, now: float) -> tuple[int | None, str]:
        if self.vcgencmd is not None:
            flags = self.vcgencmd.poll(now)
            if flags is not None:
                return flags, "vcgencmd"
        if self._throttle_file is not None:
            flags = parse_throttled(_read_text(self._throttle_file, 64) or "")
            if flags is not None:
                return flags, "get_throttled"
        if self._undervolt_file is not None:
            alarm = _read_int(self._undervolt_file)
            if alarm is not None:
                return (0x1 if alarm else 0x0), "rpi_volt"
        return None, ""

    def _thermal(self, now: float) -> Thermal:
        temperature, tripped, zone = self._temperature()
        flags, flag_source = self._throttle_flags(now)
        if self._gpu_load_file is not None:
            permille = _read_int(self._gpu_load_file)
            self.gpu_load_percent = permille / 10.0 if permille is not None else None
        throttled = tripped or (flags is not None and throttled_now(flags))
        source = "+".join(s for s in (zone, flag_source) if s)
        return Thermal(
            temperature_c=round(temperature, 1) if temperature is not None else None,
            throttled=throttled,
            # Only vcgencmd and the firmware's sysfs file give the raw bits the field describes.
            throttle_flags=flags if flag_source in {"vcgencmd", "get_throttled"} else None,
            source=source[:256],
        )

    def _battery(self) -> Battery | None:
        battery = psutil.sensors_battery() if self._live_root else None
        if battery is None:
            return None
        plugged = battery.power_plugged
        return Battery(
            percent=min(100.0, max(0.0, float(battery.percent))),
            plugged=bool(plugged) if plugged is not None else None,
        )

    def _accelerators(self, now: float) -> tuple[str, ...]:
        if now - self._accelerators_at >= ACCELERATOR_RECHECK_S:
            self._accelerators_at = now
            self._device_accelerators = device_accelerators(self.root)[0]
        return self._device_accelerators

    def _counters(self, counters: Mapping[str, int]) -> dict[str, int]:
        clean: dict[str, int] = {}
        for key, value in counters.items():
            if len(clean) >= 256:
                self._warn_once("counters", "capacity: more than 256 counters, rest dropped")
                break
            if (
                isinstance(key, str)
                and len(key) <= 96
                and isinstance(value, int)
                and not isinstance(value, bool)
                and 0 <= value <= _MAX_COUNT
            ):
                clean[key] = value
            else:
                self._warn_once(f"counter:{key}", f"capacity: counter {key!r}={value!r} dropped")
        return clean


# ---------------------------------------------------------------- change detection


def _free_slots(report: CapacityReport) -> int:
    return max(0, report.slots.total - report.slots.busy)


def _set_change(what: str, old: list[str], new: list[str]) -> str | None:
    added, removed = sorted(set(new) - set(old)), sorted(set(old) - set(new))
    if not added and not removed:
        return None
    parts = [f"+{a}" for a in added] + [f"-{r}" for r in removed]
    return f"{what} changed: {' '.join(parts)}"


def _slots_change(prev: CapacityReport, new: CapacityReport) -> str | None:
    before, after = _free_slots(prev), _free_slots(new)
    return f"free slots {before} -> {after}" if (before == 0) != (after == 0) else None


def _throttle_change(prev: CapacityReport, new: CapacityReport) -> str | None:
    if prev.thermal.throttled == new.thermal.throttled:
        return None
    return "throttling started" if new.thermal.throttled else "throttling ended"


def _battery_change(prev: CapacityReport, new: CapacityReport) -> str | None:
    if prev.battery is None or new.battery is None:
        if (prev.battery is None) == (new.battery is None):
            return None
        return "battery appeared" if new.battery is not None else "battery gone"
    p, n = prev.battery.percent, new.battery.percent
    for threshold in BATTERY_THRESHOLDS:
        if (p < threshold) != (n < threshold):
            return f"battery {p:.0f}% -> {n:.0f}% crossed {threshold:.0f}%"
    plugged = (prev.battery.plugged, new.battery.plugged)
    if None not in plugged and plugged[0] != plugged[1]:
        return "power plugged in" if new.battery.plugged else "power unplugged"
    return None


def _memory_change(prev: CapacityReport, new: CapacityReport) -> str | None:
    p, n = prev.memory.available, new.memory.available
    if abs(n - p) > MEMORY_CHANGE_FRACTION * p or (p == 0 and n > 0):
        return f"available memory {p >> 20} MiB -> {n >> 20} MiB"
    return None


def _temperature_change(prev: CapacityReport, new: CapacityReport) -> str | None:
    p, n = prev.thermal.temperature_c, new.thermal.temperature_c
    if p is None or n is None:
        return None
    for threshold in TEMPERATURE_THRESHOLDS_C:
        if p < threshold <= n:
            return f"temperature {p:.1f} -> {n:.1f} C rose past {threshold:.0f} C"
        if p >= threshold and n < threshold - TEMPERATURE_HYSTERESIS_C:
            return f"temperature {p:.1f} -> {n:.1f} C fell below {threshold:.0f} C"
    return None


def _runtimes_change(prev: CapacityReport, new: CapacityReport) -> str | None:
    return _set_change("runtimes", prev.runtimes, new.runtimes)


def _accelerators_change(prev: CapacityReport, new: CapacityReport) -> str | None:
    return _set_change("accelerators", prev.accelerators, new.accelerators)


_CHANGE_RULES: Final[tuple[Callable[[CapacityReport, CapacityReport], str | None], ...]] = (
    _slots_change,
    _throttle_change,
    _battery_change,
    _memory_change,
    _temperature_change,
    _runtimes_change,
    _accelerators_change,
)


def significant_change(prev: CapacityReport, new: CapacityReport) -> str | None:
    """Why ``new`` deserves an immediate report compared with ``prev``, or None.

    Reasons: free slots going to or from zero, throttling starting or ending, the battery
    crossing 20 % or 10 % (or power being plugged/unplugged), available memory moving by more
    than 20 %, the die temperature crossing 70/80/90 C (2 C hysteresis on the way down), and
    the runtimes or accelerators changing. ``prev`` should be the last report *sent*, so slow
    drifts add up until they count and the hysteresis works. The caller rate-limits.
    """
    for rule in _CHANGE_RULES:
        reason = rule(prev, new)
        if reason is not None:
            return reason
    return None
