from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from lepton.agent.telemetry.board import (
    VcgencmdReader,
    device_class_for,
    parse_throttled,
    read_device_model,
    throttled_now,
)
from lepton.agent.telemetry.capacity import CapacitySampler
from lepton.agent.telemetry.probe import ProbeResult
from lepton.protocol.codec import decode, encode
from lepton.protocol.messages import (
    Bench,
    CapacityReport,
    Slots,
)

SLOTS = Slots(total=2, busy=1, queued=0)
PROBE = ProbeResult(
    bench=Bench(fp32_gflops=12.5, int8_gops=40.0, runtime="onnxruntime 1.32.0", measured_at=1.0),
    runtimes=("onnxruntime",),
    accelerators=("cpu",),
)


def _write(root: Path, rel: str, content: str | bytes, mode: int | None = None) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    if mode is not None:
        path.chmod(mode)
    return path


def _zone(root: Path, n: int, kind: str, milli_c: int, trips: dict[str, int] | None = None) -> None:
    base = f"sys/class/thermal/thermal_zone{n}"
    _write(root, f"{base}/type", kind + "\n")
    _write(root, f"{base}/temp", f"{milli_c}\n")
    for i, (trip_type, trip_temp) in enumerate((trips or {}).items()):
        _write(root, f"{base}/trip_point_{i}_type", trip_type + "\n")
        _write(root, f"{base}/trip_point_{i}_temp", f"{trip_temp}\n")


def _sample(sampler: CapacitySampler, **kw: object) -> CapacityReport:
    args: dict[str, object] = {
        "slots": SLOTS,
        "outbox_pending": 0,
        "counters": {},
        "interval_s": 30.0,
    }
    args.update(kw)
    return sampler.sample(**args)  # type: ignore[arg-type]


@pytest.fixture
def samplers() -> Iterator[list[CapacitySampler]]:
    made: list[CapacitySampler] = []
    yield made
    for s in made:
        s.close()


def _sampler(
    made: list[CapacitySampler],
    root: Path,
    *,
    probe: ProbeResult | None = PROBE,
    device_class: str | None = None,
) -> CapacitySampler:
    sampler = CapacitySampler(root / "state", probe, device_class, ("lab", "floor-2"), root=root)
    made.append(sampler)
    return sampler


# ---------------------------------------------------------------- the real machine


def test_real_sample_round_trips(
    tmp_path: Path, samplers: list[CapacitySampler], monkeypatch: pytest.MonkeyPatch
) -> None:
    sampler = CapacitySampler(tmp_path / "state", PROBE, None, ("lab",))
    samplers.append(sampler)
    # A sample never waits to measure (psutil's cpu_percent with an interval sleeps).
    intervals: list[float | None] = []
    cpu_percent = psutil.cpu_percent

    def recorded(interval: float | None = None, percpu: bool = False) -> Any:
        intervals.append(interval)
        return cpu_percent(interval=interval, percpu=percpu)

    monkeypatch.setattr(psutil, "cpu_percent", recorded)
    first = _sample(sampler, outbox_pending=3, counters={"tasks.done": 7})
    second = _sample(sampler)
    assert intervals
    assert all(not i for i in intervals), intervals
    for report in (first, second):
        assert decode(encode(report), CapacityReport) == report
    assert first.cpu.count >= 1
    assert 0.0 <= first.cpu.percent <= 100.0
    assert first.memory.total > 0
    assert 0 < first.memory.available <= first.memory.total
    assert first.disk is not None
    assert first.disk.total > 0
    assert first.network is not None
    assert first.network.tx_rate is None
    assert second.network is not None
    assert second.network.tx_rate is not None
    assert first.bench == PROBE.bench
    assert first.runtimes == ["onnxruntime"]
    assert "cpu" in first.accelerators
    assert first.counters == {"tasks.done": 7}
    assert first.outbox_pending == 3
    assert first.tags == ["lab"]
    assert first.device_model
    assert first.device_class
    assert first.uptime_s > 0


def test_probe_can_arrive_later(tmp_path: Path, samplers: list[CapacitySampler]) -> None:
    sampler = _sampler(samplers, tmp_path, probe=None)
    report = _sample(sampler)
    assert report.bench is None
    assert report.runtimes == []
    assert report.accelerators == ["cpu"]
    sampler.probe = PROBE
    report = _sample(sampler)
    assert report.bench == PROBE.bench
    assert report.accelerators == ["cpu"]


def test_invalid_inputs(tmp_path: Path, samplers: list[CapacitySampler]) -> None:
    with pytest.raises(ValueError, match="device class"):
        CapacitySampler(tmp_path, None, "not a class", (), root=tmp_path)
    with pytest.raises(ValueError, match="tags"):
        CapacitySampler(tmp_path, None, None, ("ok", "x\n"), root=tmp_path)
    sampler = _sampler(samplers, tmp_path)
    with pytest.raises(ValueError, match="interval_s"):
        _sample(sampler, interval_s=0.0)


def test_bad_counters_are_dropped(tmp_path: Path, samplers: list[CapacitySampler]) -> None:
    sampler = _sampler(samplers, tmp_path)
    report = _sample(
        sampler,
        counters={"ok": 1, "negative": -1, "x" * 97: 1, "flag": True, "float": 1.5},
        outbox_pending=-4,
    )
    assert report.counters == {"ok": 1}
    assert report.outbox_pending == 0
    assert decode(encode(report), CapacityReport) == report


# ---------------------------------------------------------------- Raspberry Pi (fake tree)


def _rpi5(root: Path) -> None:
    _write(root, "proc/device-tree/model", b"Raspberry Pi 5 Model B Rev 1.0\x00")
    _write(root, "proc/device-tree/compatible", b"raspberrypi,5-model-b\x00brcm,bcm2712\x00")
    _zone(root, 0, "cpu-thermal", 61850, {"critical": 110000})
    for cpu, khz in enumerate((2400000, 2400000, 1500000, 1500000)):
        _write(root, f"sys/devices/system/cpu/cpu{cpu}/cpufreq/scaling_cur_freq", f"{khz}\n")


def test_rpi_model_thermal_and_vcgencmd(tmp_path: Path, samplers: list[CapacitySampler]) -> None:
    _rpi5(tmp_path)
    _write(tmp_path, "usr/bin/vcgencmd", "#!/bin/sh\necho throttled=0x50005\n", mode=0o755)
    sampler = _sampler(samplers, tmp_path)
    report = _sample(sampler)
    assert report.device_model == "Raspberry Pi 5 Model B Rev 1.0"
    assert report.device_class == "rpi5"
    assert report.cpu.freq_mhz == [2400.0, 2400.0, 1500.0, 1500.0]
    assert report.thermal.temperature_c == 61.9
    assert report.thermal.throttle_flags == 0x50005
    assert report.thermal.throttled
    assert report.thermal.source == "cpu-thermal+vcgencmd"
    assert decode(encode(report), CapacityReport) == report


def test_rpi_past_throttling_is_not_current(
    tmp_path: Path, samplers: list[CapacitySampler]
) -> None:
    _rpi5(tmp_path)
    _write(tmp_path, "usr/bin/vcgencmd", "#!/bin/sh\necho throttled=0x50000\n", mode=0o755)
    report = _sample(_sampler(samplers, tmp_path))
    assert report.thermal.throttle_flags == 0x50000
    assert not report.thermal.throttled


def test_rpi_sysfs_fallback_when_vcgencmd_fails(
    tmp_path: Path, samplers: list[CapacitySampler]
) -> None:
    _rpi5(tmp_path)
    _write(
        tmp_path,
        "usr/bin/vcgencmd",
        "#!/bin/sh\necho 'VCHI initialization failed' >&2\nexit 255\n",
        mode=0o755,
    )
    _write(tmp_path, "sys/devices/platform/soc/soc:firmware/get_throttled", "4\n")
    sampler = _sampler(samplers, tmp_path)
    assert sampler.vcgencmd is not None
    assert sampler.vcgencmd.failures == 1
    report = _sample(sampler)
    assert report.thermal.throttle_flags == 0x4
    assert report.thermal.throttled
    assert report.thermal.source == "cpu-thermal+get_throttled"


def test_rpi5_firmware_path_and_hwmon_undervoltage(
    tmp_path: Path, samplers: list[CapacitySampler]
) -> None:
    _rpi5(tmp_path)
    _write(tmp_path, "sys/class/hwmon/hwmon1/name", "rpi_volt\n")
    _write(tmp_path, "sys/class/hwmon/hwmon1/in0_lcrit_alarm", "1\n")
    report = _sample(_sampler(samplers, tmp_path))
    assert report.thermal.throttled  # under-voltage now
    assert report.thermal.throttle_flags is None  # not raw firmware bits
    assert report.thermal.source == "cpu-thermal+rpi_volt"


def test_vcgencmd_reader_refreshes_without_blocking(tmp_path: Path) -> None:
    script = _write(tmp_path, "vcgencmd", "#!/bin/sh\necho throttled=0x8\n", mode=0o755)
    reader = VcgencmdReader(str(script), interval=30.0, timeout=5.0)
    try:
        assert reader.poll(now=1000.0) is None  # started, not yet collected
        assert reader._proc is not None
        reader._proc.wait(timeout=5)
        assert reader.poll(now=1000.5) == 0x8
        assert reader._proc is None  # collected; next run only after the interval
        assert reader.poll(now=1010.0) == 0x8
        assert reader._proc is None
        # Three intervals without a fresh answer: stale, and a refresh is under way.
        assert reader.poll(now=1000.5 + 91.0) is None
        assert reader._proc is not None
    finally:
        reader.close()


def test_vcgencmd_reader_kills_a_hung_command(tmp_path: Path) -> None:
    script = _write(tmp_path, "vcgencmd", "#!/bin/sh\nexec sleep 30\n", mode=0o755)
    reader = VcgencmdReader(str(script), interval=1.0, timeout=2.0)
    try:
        reader.poll(now=0.0)
        assert reader._proc is not None
        reader.poll(now=2.5)  # past the timeout: killed and counted as a failure
        assert reader._proc is None
        assert reader.failures == 1
        reader.poll(now=3.5)
        reader.poll(now=6.0)
        reader.poll(now=7.0)
        reader.poll(now=9.5)
        assert reader.disabled
        assert reader.poll(now=100.0) is None
        assert reader._proc is None
    finally:
        reader.close()


def test_vcgencmd_reader_times_out_at_start(tmp_path: Path) -> None:
    script = _write(tmp_path, "vcgencmd", "#!/bin/sh\nexec sleep 30\n", mode=0o755)
    reader = VcgencmdReader(str(script), timeout=0.2)
    assert reader.read_now() is None
    assert reader.failures == 1


@pytest.mark.parametrize(
    ("text", "flags"),
    [
        ("throttled=0x0\n", 0),
        ("throttled=0x50005", 0x50005),
        ("50005\n", 0x50005),
        ("0xe0000", 0xE0000),
        ("garbage", None),
        ("", None),
    ],
)
def test_parse_throttled(text: str, flags: int | None) -> None:
    assert parse_throttled(text) == flags


def test_throttled_now_bits() -> None:
    assert not throttled_now(0x0)
    assert not throttled_now(0xF0000)  # only "has occurred since boot"
    for bit in (0x1, 0x2, 0x4, 0x8):
        assert throttled_now(bit | 0x50000)


# ---------------------------------------------------------------- Jetson (fake tree)


def _jetson_orin_nano(root: Path) -> None:
    _write(root, "proc/device-tree/model", b"NVIDIA Jetson Orin Nano Developer Kit\x00")
    _write(
        root,
        "proc/device-tree/compatible",
        b"nvidia,p3768-0000+p3767-0005\x00nvidia,p3767-0005\x00nvidia,tegra234\x00",
    )
    _write(root, "etc/nv_tegra_release", "# R36 (release), REVISION: 4.0\n")
    _zone(root, 0, "cpu-thermal", 52000, {"passive": 99000, "critical": 105000})
    _zone(root, 1, "gpu-thermal", 55500, {"passive": 99000})
    _zone(root, 2, "PMIC-Die", 100000)  # a constant on some boards: must be ignored
    _zone(root, 3, "Tboard_tegra", 40000)
    _write(root, "sys/devices/gpu.0/load", "123\n")


def test_jetson_detection(tmp_path: Path, samplers: list[CapacitySampler]) -> None:
    _jetson_orin_nano(tmp_path)
    probe = ProbeResult(
        bench=PROBE.bench, runtimes=("onnxruntime",), accelerators=("cpu", "cuda", "jetson")
    )
    sampler = _sampler(samplers, tmp_path, probe=probe)
    assert sampler.is_tegra
    report = _sample(sampler)
    assert report.device_class == "jetson-orin-nano"
    assert report.thermal.temperature_c == 55.5
    assert report.thermal.source == "gpu-thermal"
    assert not report.thermal.throttled
    assert report.thermal.throttle_flags is None
    assert sampler.gpu_load_percent == 12.3
    # The GPU nodes are hidden (PrivateDevices=yes): "jetson" is not claimed.
    assert report.accelerators == ["cpu", "cuda"]


def test_jetson_gpu_visible_and_trip_point_throttling(
    tmp_path: Path, samplers: list[CapacitySampler]
) -> None:
    _jetson_orin_nano(tmp_path)
    _write(tmp_path, "dev/nvmap", "")
    _zone(tmp_path, 0, "cpu-thermal", 99500, {"passive": 99000, "critical": 105000})
    report = _sample(_sampler(samplers, tmp_path))
    assert report.accelerators == ["cpu", "jetson"]
    assert report.thermal.throttled
    assert report.thermal.temperature_c == 99.5


def test_configured_class_wins(tmp_path: Path, samplers: list[CapacitySampler]) -> None:
    _jetson_orin_nano(tmp_path)
    report = _sample(_sampler(samplers, tmp_path, device_class="lab-bench-7"))
    assert report.device_class == "lab-bench-7"


def test_dmi_fallback(tmp_path: Path) -> None:
    _write(tmp_path, "sys/class/dmi/id/product_name", "Standard PC (Q35 + ICH9, 2009)\n")
    assert read_device_model(tmp_path) == "Standard PC (Q35 + ICH9, 2009)"
    assert read_device_model(tmp_path / "empty")  # platform.machine()


@pytest.mark.parametrize(
    ("model", "compatible", "machine", "expected"),
    [
        ("Raspberry Pi 5 Model B Rev 1.0", b"", "aarch64", "rpi5"),
        ("Raspberry Pi 4 Model B Rev 1.4", b"", "aarch64", "rpi4"),
        ("Raspberry Pi Compute Module 4 Rev 1.0", b"", "aarch64", "rpi4"),
        ("Raspberry Pi 400 Rev 1.0", b"", "aarch64", "rpi4"),
        ("Raspberry Pi 500 Rev 1.0", b"", "aarch64", "rpi5"),
        ("Raspberry Pi Zero 2 W Rev 1.0", b"", "aarch64", "rpi-zero2"),
        ("Raspberry Pi 3 Model B Plus Rev 1.3", b"", "armv7l", "rpi3"),
        ("", b"raspberrypi,4-model-b\x00brcm,bcm2711\x00", "aarch64", "rpi4"),
        ("NVIDIA Jetson Orin Nano Developer Kit", b"", "aarch64", "jetson-orin-nano"),
        (
            "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super",
            b"",
            "aarch64",
            "jetson-orin-nano",
        ),
        ("NVIDIA Jetson Orin NX Engineering Reference Developer Kit", b"", "", "jetson-orin-nx"),
        ("Jetson AGX Orin", b"", "aarch64", "jetson-agx-orin"),
        ("NVIDIA Jetson Xavier NX Developer Kit", b"", "aarch64", "jetson-xavier-nx"),
        ("Jetson-AGX", b"nvidia,tegra194\x00", "aarch64", "jetson-agx-xavier"),
        ("NVIDIA Jetson Nano Developer Kit", b"", "aarch64", "jetson-nano"),
        ("quill", b"nvidia,tegra186\x00", "aarch64", "jetson-tx2"),
        ("Some Board", b"nvidia,p3701\x00nvidia,tegra234\x00", "aarch64", "jetson-orin"),
        ("Standard PC (Q35 + ICH9, 2009)", b"", "x86_64", "x86_64"),
        ("MacBookPro", b"", "arm64", "aarch64"),
        ("Generic", b"", "AMD64", "x86_64"),
    ],
)
def test_device_class_for(model: str, compatible: bytes, machine: str, expected: str) -> None:
    assert device_class_for(model, compatible, machine) == expected
