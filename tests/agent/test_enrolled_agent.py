"""A real agent process, enrolled with the real CLI against a server speaking the enrolment
contract, runs on a real broker with its identity: its downloads carry its token to the
coordinator's origin and to no other, and a refused token is named in the result."""

from __future__ import annotations

import signal
from pathlib import Path

from tests.support.agents import AgentProcess, Sink, write_agent_config
from tests.support.broker import Broker
from tests.support.enrolserver import FakeEnrolment
from tests.support.httpserver import Fault, HttpServer


async def test_an_enrolled_agent_sends_its_token_to_the_coordinator_only(
    broker: Broker, tmp_path: Path
) -> None:
    with HttpServer() as coord, HttpServer() as cdn:
        fake = FakeEnrolment(coord.base_url, broker_port=broker.port)
        coord.post_handler = fake
        state = tmp_path / "state"
        cfg = write_agent_config(
            tmp_path / "agent.toml",
            device_id="pi-1",
            port=broker.port,
            state_dir=state,
            fetch={"origins": [cdn.base_url]},
            enrol=(coord.base_url, fake.claim()),
        )
        token = fake.enrolled["pi-1"].http_token
        proc = AgentProcess(config_path=cfg, log_path=tmp_path / "pi-1.log")
        proc.start()
        try:
            async with Sink(broker.port) as sink:
                await sink.wait(lambda: sink.state_of("pi-1") == "online", 20, "online")
                blobs = {"coord": coord, "cdn": cdn}
                results = {}
                for name, server in blobs.items():
                    data = f"not a model, from {name}".encode()
                    digest = server.add(data)
                    task = await sink.send_task(
                        "pi-1",
                        "deploy",
                        name=name,
                        digest=digest,
                        size=len(data),
                        url=server.url(digest),
                        format="onnx",
                    )
                    await sink.wait(lambda t=task: bool(sink.results_for({t.task_id})), 20, name)
                    results[name] = sink.results_for({task.task_id})[task.task_id]
                (got,) = [r for r in coord.requests if r.method == "GET"]
                assert got.headers["Authorization"] == f"Bearer {token}"
                (other,) = cdn.requests
                assert "Authorization" not in other.headers
                # A coordinator that no longer takes the token: the result says so.
                data = b"secured"
                digest = coord.add(data)
                coord.fault(digest, Fault(kind="status", status=401, times=-1))
                task = await sink.send_task(
                    "pi-1",
                    "deploy",
                    name="secured",
                    digest=digest,
                    size=len(data),
                    url=coord.url(digest),
                    format="onnx",
                )
                await sink.wait(lambda: bool(sink.results_for({task.task_id})), 20, "refused")
                refused = sink.results_for({task.task_id})[task.task_id]
                assert refused.status == "failed"
                assert "token_refused" in (refused.error or "")
        finally:
            proc.signal(signal.SIGTERM)
            proc.wait()
        log = proc.log()
        assert token not in log
        assert fake.enrolled["pi-1"].mqtt.password not in log
        assert "not enrolled" not in log
