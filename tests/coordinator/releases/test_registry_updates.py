"""Devices' update status: a birth carrying ``State.update``, sent through a real Mosquitto,
is stored in ``device_updates`` and handed to the release feature's listeners once per
change; a repeat or an older status changes nothing. The agent version is kept as before.
Also the store's rules on their own: the same manifest twice, overlapping classes."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest

from lepton.coordinator.releases.feature import ReleasesFeature
from lepton.coordinator.releases.records import DeviceUpdate
from lepton.coordinator.releases.store import patterns_overlap
from lepton.coordinator.service import Coordinator
from lepton.protocol import codec, topics
from lepton.protocol.messages import State, UpdateStatus
from tests.coordinator.conftest import eventually
from tests.support.broker import Broker
from tests.support.device import FakeDevice


async def test_update_status_in_births_is_stored_and_announced_once_per_change(
    coordinator: Coordinator, broker: Broker
) -> None:
    c = coordinator
    feature = c.feature(ReleasesFeature)
    seen: list[DeviceUpdate] = []
    threads: set[str] = set()
    lock = threading.Lock()

    def listener(changed: Sequence[DeviceUpdate]) -> None:
        with lock:
            seen.extend(changed)
            threads.add(threading.current_thread().name)

    feature.add_update_listener(listener)
    async with FakeDevice(broker.port, "pi-1", interval_s=0.5) as dev:

        def birth(status: UpdateStatus) -> None:
            state = State(
                state="online", agent_version=status.version, device_class="rpi5", update=status
            )
            dev.publish(topics.STATE, codec.encode(state))

        now = time.time()
        trial = UpdateStatus(
            version="1.1.0",
            outcome="trial",
            target="1.1.0",
            slot="b",
            floor="1.0.0",
            task_id="t-1",
            at=now,
        )
        birth(trial)
        await eventually(lambda: len(seen) == 1)
        stored = feature.updates.get_many(["pi-1", "nobody"])
        assert set(stored) == {"pi-1"}
        assert stored["pi-1"].outcome == "trial"
        assert stored["pi-1"].task_id == "t-1"
        assert seen[0] == stored["pi-1"]
        assert c.store.devices.get_device("pi-1").agent_version == "1.1.0"
        # The same status again (a reconnect's birth), then an older one: no change.
        birth(trial)
        birth(UpdateStatus(version="1.0.0", outcome="committed", at=now - 60))
        committed = UpdateStatus(
            version="1.1.0",
            outcome="committed",
            target="1.1.0",
            slot="b",
            floor="1.1.0",
            task_id="t-1",
            at=now + 1,
        )
        birth(committed)
        await eventually(lambda: len(seen) == 2)
        assert seen[1].outcome == "committed"
        assert feature.updates.get_many(["pi-1"])["pi-1"].floor == "1.1.0"
        # A birth without an update status leaves the stored one alone.
        dev.publish(topics.STATE, codec.encode(State(state="online", agent_version="x")))
        await eventually(lambda: c.store.devices.get_device("pi-1").agent_version == "x")
    assert len(seen) == 2
    assert feature.updates.get_many(["pi-1"])["pi-1"].outcome == "committed"
    assert threads
    assert "MainThread" not in threads


@pytest.mark.parametrize(
    ("a", "b", "overlap"),
    [
        ("rpi5", "rpi5", True),
        ("rpi5", "rpi4", False),
        ("rpi*", "rpi5", True),
        ("rpi5", "jetson-*", False),
        ("rpi*", "jetson-*", False),
        ("rpi*", "rp?5", True),
        ("*", "jetson-*", True),
    ],
)
def test_device_class_patterns_overlap_conservatively(a: str, b: str, overlap: bool) -> None:
    assert patterns_overlap(a, b) is overlap
    assert patterns_overlap(b, a) is overlap
