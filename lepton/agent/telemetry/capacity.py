"""Capacity telemetry: what this device can do right now, as a :class:`CapacityReport`.

:class:`CapacitySampler` reads psutil and sysfs (through :mod:`lepton.agent.telemetry.board`). A
sample is cheap (well under a few ms): the only helper process, Raspberry Pi's ``vcgencmd
get_throttled``, runs at most every 30 s and is collected on a later sample instead of being waited
for. Device model and class, thermal zones and throttle sources are found once, at construction.

Readings that go through ``root`` (device tree, DMI, cpufreq, thermal zones, throttle files,
device nodes, ``vcgencmd`` under ``usr/bin``) can be pointed at a fake tree in tests; psutil
readings (CPU load, memory, disk, network, battery) always describe the real machine.

:func:`lepton.agent.telemetry.changes.significant_change` is the rule for when a new sample is worth
an immediate report.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

import psutil

from lepton.agent.telemetry.board import (
    CPU_ZONE_RE,
    DEVICE_ACCELERATORS,
    JETSON_GPU_LOAD,
    NOT_CPU_ZONE_RE,
    VcgencmdReader,
    device_accelerators,
    device_class_for,
    is_tegra,
    numeric_suffix,
    parse_throttled,
    read_device_model,
    read_int,
    read_raw,
    read_text,
    rpi_throttle_file,
    rpi_undervolt_file,
    thermal_zones,
    throttled_now,
    vcgencmd_path,
)
from lepton.agent.telemetry.probe import ProbeResult
from lepton.protocol.messages import (
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

#: Device-node accelerators are re-checked this often (a few stat calls).
ACCELERATOR_RECHECK_S: Final = 30.0


_NAME_RE: Final = re.compile(r"[A-Za-z0-9._:/-]{1,64}")  # protocol Name; used with fullmatch
_MAX_COUNT: Final = 2**62


class Sampler(Protocol):
    """What the daemon needs from a sampler (the fleet simulator provides its own)."""

    @property
    def probe(self) -> ProbeResult | None: ...

    @probe.setter
    def probe(self, probe: ProbeResult | None) -> None: ...

    @property
    def device_class(self) -> str | None: ...

    def sample(
        self,
        *,
        slots: Slots,
        outbox_pending: int,
        counters: Mapping[str, int],
        interval_s: float,
    ) -> CapacityReport: ...


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
        compatible = read_raw(root / "proc/device-tree/compatible") or b""
        self.device_class = device_class or device_class_for(self.device_model, compatible)
        self.is_tegra = is_tegra(root)
        self._zones = thermal_zones(root)
        self._cpufreq = sorted(
            (root / "sys/devices/system/cpu").glob("cpu[0-9]*/cpufreq/scaling_cur_freq"),
            key=lambda p: numeric_suffix(p.parent.parent),
        )
        self._throttle_file = rpi_throttle_file(root)
        self._undervolt_file = rpi_undervolt_file(root)
        self._gpu_load_file = (
            next((root / rel for rel in JETSON_GPU_LOAD if (root / rel).is_file()), None)
            if self.is_tegra
            else None
        )
        vcgencmd = vcgencmd_path(root)
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
            khz = read_int(path)
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
            milli = read_int(zone.temp)
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
            chips = [c for c in sensors if not NOT_CPU_ZONE_RE.search(c)]
            cpu_chips = [c for c in chips if CPU_ZONE_RE.search(c) or c.startswith("k10")]
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
            flags = parse_throttled(read_text(self._throttle_file, 64) or "")
            if flags is not None:
                return flags, "get_throttled"
        if self._undervolt_file is not None:
            alarm = read_int(self._undervolt_file)
            if alarm is not None:
                return (0x1 if alarm else 0x0), "rpi_volt"
        return None, ""

    def _thermal(self, now: float) -> Thermal:
        temperature, tripped, zone = self._temperature()
        flags, flag_source = self._throttle_flags(now)
        if self._gpu_load_file is not None:
            permille = read_int(self._gpu_load_file)
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
