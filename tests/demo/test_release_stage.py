"""The demo's release stages on a real stack (mosquitto, coordinator, simulated fleet as
processes): a signed release reaches every device in phases; a broken one aborts at its
canary and every device ends on the good version."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from lepton.demo.broker import mosquitto_binary
from lepton.demo.release import (
    BROKEN,
    GOOD,
    STAGES,
    START,
    ReleaseStages,
    phases_for,
    stack_options,
)
from lepton.demo.release_kit import ReleaseKit, fleet_versions
from lepton.demo.stack import Stack, StackSpec

pytestmark = pytest.mark.slow
DEVICES = 12


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, str]] = []

    def begin(self, stage: str, total: int | None = None, detail: str = "") -> None:
        self.events.append(("begin", stage, detail))

    def update(self, stage: str, completed: int | None = None, detail: str | None = None) -> None:
        pass

    def end(self, stage: str, detail: str = "") -> None:
        self.events.append(("end", stage, detail))

    def fail(self, stage: str, detail: str) -> None:
        self.events.append(("fail", stage, detail))


@pytest.mark.timeout(300)
def test_a_good_release_rolls_out_and_a_broken_one_stops_at_its_canary(tmp_path: Path) -> None:
    if mosquitto_binary() is None:
        pytest.fail("mosquitto binary not found; scripts/test installs it")
    kit = ReleaseKit.create(tmp_path / "release")
    spec = StackSpec(
        workdir=tmp_path / "stack",
        devices=DEVICES,
        data=None,
        host_gflops=20.0,
        **stack_options(kit, trial_s=0.5),
    )
    recorder = Recorder()
    with Stack(spec) as stack:
        stack.start_broker()
        stack.start_coordinator()
        stack.start_fleet()
        deadline = time.monotonic() + 120
        stages = ReleaseStages(stack, kit, recorder, timeout_s=120)
        # The stages wait for the rollout, not for the fleet: let it come up first.
        with httpx.Client(
            base_url=stack.api_url, headers=stack.headers, verify=stack.verify, timeout=10
        ) as api:
            while fleet_versions(api).get(START, 0) < DEVICES:
                assert time.monotonic() < deadline, "the fleet did not come up"
                stack.check_alive()
                time.sleep(0.2)
        figures = stages.run()
    good, bad = figures["release"], figures["release_bad"]
    assert (good["state"], good["by_state"]["succeeded"]) == ("completed", DEVICES)
    assert good["versions"] == {GOOD: DEVICES}
    assert (bad["version"], bad["state"], bad["phase"]) == (BROKEN, "aborted", 0)
    took = sum(n for s, n in bad["by_state"].items() if s not in ("pending", "skipped"))
    assert 0 < took <= phases_for(DEVICES)[0]["count"] == 3
    assert bad["by_state"]["rolled_back"] == took  # the build crashes on every device
    assert bad["versions"] == {GOOD: DEVICES}
    assert [e[:2] for e in recorder.events] == [
        (kind, key) for key, _ in STAGES for kind in ("begin", "end")
    ]
