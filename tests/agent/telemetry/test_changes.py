from __future__ import annotations

import msgspec
import pytest

from lepton.agent.telemetry.changes import significant_change
from lepton.protocol.messages import Battery, CapacityReport, Cpu, Memory, Slots, Thermal


def _report(**kw: object) -> CapacityReport:
    base = CapacityReport(
        cpu=Cpu(count=4),
        memory=Memory(total=4 << 30, available=2 << 30),
        thermal=Thermal(temperature_c=50.0),
        battery=Battery(percent=80.0, plugged=True),
        slots=Slots(total=2, busy=1),
        runtimes=["onnxruntime"],
        accelerators=["cpu"],
    )
    return msgspec.structs.replace(base, **kw)


def test_no_change() -> None:
    prev = _report()
    new = _report(
        memory=Memory(total=4 << 30, available=int(2.2 * (1 << 30))),
        thermal=Thermal(temperature_c=55.0),
        battery=Battery(percent=75.0, plugged=True),
    )
    assert significant_change(prev, new) is None


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"slots": Slots(total=2, busy=2)}, "free slots 1 -> 0"),
        ({"thermal": Thermal(temperature_c=50.0, throttled=True)}, "throttling started"),
        ({"battery": Battery(percent=19.0, plugged=True)}, "crossed 20%"),
        ({"battery": Battery(percent=80.0, plugged=False)}, "power unplugged"),
        ({"battery": None}, "battery gone"),
        ({"memory": Memory(total=4 << 30, available=1 << 30)}, "available memory 2048 MiB"),
        ({"thermal": Thermal(temperature_c=70.5)}, "rose past 70 C"),
        ({"runtimes": ["onnxruntime", "tflite"]}, "runtimes changed: +tflite"),
        ({"accelerators": ["cpu", "edgetpu"]}, "accelerators changed: +edgetpu"),
        ({"data_sizes": {"digits": 180}}, "data sizes changed: digits ? -> 180"),
    ],
)
def test_change_reasons(change: dict[str, object], reason: str) -> None:
    got = significant_change(_report(), _report(**change))
    assert got is not None
    assert reason in got


def test_slots_free_again() -> None:
    full = _report(slots=Slots(total=2, busy=2))
    assert significant_change(full, _report()) == "free slots 0 -> 1"
    # Staying above zero is not news.
    assert significant_change(_report(slots=Slots(total=4, busy=1)), _report()) is None


def test_battery_crossing_ten_percent() -> None:
    prev = _report(battery=Battery(percent=12.0, plugged=False))
    new = _report(battery=Battery(percent=9.0, plugged=False))
    reason = significant_change(prev, new)
    assert reason is not None
    assert "crossed 10%" in reason


def test_temperature_hysteresis() -> None:
    hot = _report(thermal=Thermal(temperature_c=81.0))
    assert significant_change(hot, _report(thermal=Thermal(temperature_c=79.0))) is None
    reason = significant_change(hot, _report(thermal=Thermal(temperature_c=77.5)))
    assert reason is not None
    assert "fell below 80 C" in reason
    unknown = _report(thermal=Thermal(temperature_c=None))
    assert significant_change(unknown, hot) is None


def test_memory_from_zero() -> None:
    prev = _report(memory=Memory(total=4 << 30, available=0))
    assert significant_change(prev, _report()) is not None


def test_a_data_source_size_change_is_news_once() -> None:
    known = _report(data_sizes={"digits": 180})
    assert significant_change(known, _report(data_sizes={"digits": 180})) is None
    got = significant_change(known, _report(data_sizes={"digits": 200, "cam": 5}))
    assert got == "data sizes changed: cam ? -> 5 digits 180 -> 200"
