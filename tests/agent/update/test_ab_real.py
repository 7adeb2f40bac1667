"""Real agent images through the A/B path: real venvs, real signed bundles, real agent
processes started by the shipped unit's ExecStartPre/ExecStart lines (see supervisor.py for
what stands in for systemd), a real Mosquitto broker, and the device's reports read from it.

A 0.9.0 is provisioned; B 1.0.0 installed from a bundle file (``lepton-agent update install``,
direct mode), becomes healthy and is committed; reverted to A. A B that crashes at start is
rolled back by the boot step (crash loop); a B that starts but never reaches the broker is
rolled back at its deadline. Each reports why in its birth message.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import paho.mqtt.client as mqtt
import pytest

from lepton.agent.update import slots
from lepton.protocol import topics
from lepton.protocol.codec import decode
from lepton.protocol.messages import State
from tests.agent.update import images
from tests.agent.update.supervisor import PathUnit, Supervisor
from tests.support.broker import Broker

pytestmark = pytest.mark.timeout(240)


class Reports:
    """The device's retained state messages, as the coordinator would see them."""

    def __init__(self, broker: Broker, topic: str) -> None:
        self.items: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        self._client.on_message = self._on_message
        self._client.connect("127.0.0.1", broker.port)
        self._client.subscribe(topic, qos=1)
        self._client.loop_start()

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        with self._cond:
            self.items.append(msgspec.to_builtins(decode(msg.payload, State)))
            self._cond.notify_all()

    def mark(self) -> int:
        with self._cond:
            return len(self.items)

    def wait(
        self, pred: Callable[[dict[str, Any]], bool], timeout: float, what: str, since: int = 0
    ) -> dict[str, Any]:
        """The first report from index ``since`` on whose update status ``pred`` accepts."""
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                for item in self.items[since:]:
                    if item.get("state") == "online" and pred(item.get("update") or {}):
                        return item["update"]  # type: ignore[no-any-return]
                left = end - time.monotonic()
                if left <= 0:
                    seen = [i.get("update") for i in self.items[-5:]]
                    raise AssertionError(f"no report {what}; last: {seen}")
                self._cond.wait(left)

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ab")


@pytest.fixture(scope="module")
def keys() -> images.Keys:
    return images.make_keys()


@pytest.fixture(scope="module")
def bundles(work: Path, keys: images.Keys) -> dict[str, Path]:
    t0 = time.monotonic()
    out = {
        "A": images.build_bundle(keys, "0.9.0", work),
        "B": images.build_bundle(keys, "1.0.0", work, floor="0.9.0"),
        "B_crash": images.build_bundle(keys, "1.0.0", work, variant="crash"),
        "B_no_broker": images.build_bundle(keys, "1.0.0", work, variant="no_broker"),
    }
    print(f"images built in {time.monotonic() - t0:.1f} s")
    return out


@pytest.fixture(scope="module")
def factory_root(work: Path, keys: images.Keys, bundles: dict[str, Path]) -> Path:
    """A device root with A provisioned in slot a (each test starts from it: the fixture
    ``device`` puts A back as the committed image afterwards)."""
    t0 = time.monotonic()
    root = work / "opt-lepton"
    images.provision(root, bundles["A"], keys, work)
    print(f"A provisioned in {time.monotonic() - t0:.1f} s")
    return root


@pytest.fixture
def device(
    tmp_path: Path, work: Path, keys: images.Keys, factory_root: Path, broker: Broker,
    request: pytest.FixtureRequest,
) -> Iterator[dict[str, Any]]:  # fmt: skip
    root = factory_root
    (work / "etc").mkdir(exist_ok=True)
    root_file = work / "etc" / "release-root.json"
    root_file.write_bytes(keys.root_json)
    state_dir = tmp_path / "state"
    param = getattr(request, "param", {})
    deadline_s = param.get("deadline", 60.0)
    mode = param.get("mode", "direct")
    restart = "" if mode == "direct" else f"touch {root.parent / 'restart-agent'}"
    config = tmp_path / "agent.toml"
    config.write_text(
        f"""
[device]
id = "dev1"
class = "{images.DEVICE_CLASS}"
[broker]
port = {broker.port}
reconnect_min_s = 0.2
reconnect_max_s = 0.5
[agent]
state_dir = "{state_dir}"
probe = false
capacity_interval_s = 2.0
capacity_min_interval_s = 0.1
drain_timeout_s = 2.0
[update]
enabled = true
root = "{root}"
root_file = "{root_file}"
mode = "{mode}"
restart_command = "{restart}"
health_deadline_s = {deadline_s}
"""
    )
    reports = Reports(broker, topics.device_topic("default", "dev1", topics.STATE))
    sup = Supervisor(root, config, log=tmp_path / "agent.log").start()
    units = None
    if mode == "service":
        env = {**sup.env(), "LEPTON_CONFIG": str(config)}
        units = PathUnit(root, state_dir, env, restart, log=tmp_path / "agent.log").start()
    try:
        yield {"root": root, "config": config, "reports": reports, "sup": sup, "units": units}
    finally:
        if units is not None:
            units.stop()
        sup.stop()
        reports.close()
        log = tmp_path / "agent.log"
        print(log.read_text()[-3000:] if log.exists() else "no agent log")
        # Put A back as the factory image for the next test (slot b is left as it is).
        fresh = slots.empty_state()
        fresh["committed"] = {"slot": "a", "version": "0.9.0"}
        (root / "boot.json").write_text(json.dumps(fresh))
        (root / "current").unlink()
        (root / "current").symlink_to("slots/a")


def cli(device: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    """``lepton-agent update ...`` of the image ``current`` points at."""
    exe = device["root"] / "current" / "venv" / "bin" / "lepton-agent"
    return subprocess.run(
        [str(exe), "update", "--config", str(device["config"]), *args],
        capture_output=True, text=True, timeout=180, env=device["sup"].env(), check=False,
    )  # fmt: skip


def test_update_then_revert(device: dict[str, Any], bundles: dict[str, Path]) -> None:
    reports: Reports = device["reports"]
    first = reports.wait(lambda u: u.get("version") == "0.9.0", 30, "from A")
    assert first["slot"] == "a"
    t0 = time.monotonic()
    done = cli(device, "install", str(bundles["B"]))
    assert done.returncode == 0, done.stderr + done.stdout
    installed = time.monotonic() - t0
    up = reports.wait(
        lambda u: u.get("version") == "1.0.0" and u.get("outcome") == "committed", 60, "B committed"
    )
    print(f"install {installed:.1f} s, B committed {time.monotonic() - t0:.1f} s after start")
    assert (up["slot"], up["floor"]) == ("b", "0.9.0")
    # Back to A: the other slot's committed version, on trial again, committed as reverted.
    t1 = time.monotonic()
    done = cli(device, "revert")
    assert done.returncode == 0, done.stderr + done.stdout
    back = reports.wait(
        lambda u: u.get("version") == "0.9.0" and u.get("outcome") == "reverted", 60, "A reverted"
    )
    print(f"revert committed {time.monotonic() - t1:.1f} s after the request")
    assert back["slot"] == "a"
    assert back["floor"] == "0.9.0"  # never lowered by a revert


def test_crash_loop_rolls_back(device: dict[str, Any], bundles: dict[str, Path]) -> None:
    reports: Reports = device["reports"]
    reports.wait(lambda u: u.get("version") == "0.9.0", 30, "from A")
    since = reports.mark()
    done = cli(device, "install", str(bundles["B_crash"]))
    assert done.returncode == 0, done.stderr + done.stdout
    back = reports.wait(
        lambda u: u.get("outcome") == "rolled_back" and u.get("version") == "0.9.0", 60,
        "crash loop rolled back", since,
    )  # fmt: skip
    assert (back["reason"], back["target"], back["slot"]) == ("crash_loop", "1.0.0", "a")
    crashed = [s for s in device["sup"].starts if s.rc == 3]
    assert len(crashed) == 3, device["sup"].starts


@pytest.mark.parametrize("device", [{"deadline": 10.0}], indirect=True)
def test_never_healthy_rolls_back_at_deadline(
    device: dict[str, Any], bundles: dict[str, Path]
) -> None:
    reports: Reports = device["reports"]
    reports.wait(lambda u: u.get("version") == "0.9.0", 30, "from A")
    t0 = time.monotonic()
    since = reports.mark()
    done = cli(device, "install", str(bundles["B_no_broker"]))
    assert done.returncode == 0, done.stderr + done.stdout
    back = reports.wait(
        lambda u: u.get("outcome") == "rolled_back" and u.get("version") == "0.9.0", 60,
        "unhealthy B rolled back", since,
    )  # fmt: skip
    assert back["reason"] == "unhealthy: broker_unreachable", back
    assert back["target"] == "1.0.0"
    print(f"unhealthy B rolled back {time.monotonic() - t0:.1f} s after the request")


@pytest.mark.parametrize("device", [{"mode": "service"}], indirect=True)
def test_service_mode_update(device: dict[str, Any], bundles: dict[str, Path]) -> None:
    """The agent only writes request.json and health.json; the shipped lepton-update.service
    command (run as the path unit would) installs with the current slot's interpreter,
    restarts the agent, and commits on the new agent's verdict."""
    reports: Reports = device["reports"]
    reports.wait(lambda u: u.get("version") == "0.9.0", 30, "from A")
    since = reports.mark()
    t0 = time.monotonic()
    done = cli(device, "install", str(bundles["B"]))
    assert done.returncode == 0, done.stderr + done.stdout
    up = reports.wait(
        lambda u: u.get("version") == "1.0.0" and u.get("outcome") == "committed", 90,
        "B committed by the service", since,
    )  # fmt: skip
    print(f"service mode: B committed {time.monotonic() - t0:.1f} s after the request")
    assert (up["slot"], up["floor"]) == ("b", "0.9.0")
    assert device["units"].runs >= 2  # the request, then the verdict
    assert any(s.restarted for s in device["sup"].starts)
