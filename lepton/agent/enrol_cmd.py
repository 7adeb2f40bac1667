"""``lepton-agent enroll URL CLAIM``: the operator's command on the device (see docs/agent.md).

Exit codes: 0 enrolled, 1 refused or failed (the coordinator's reason and detail printed),
2 a usage or configuration error. Nothing is written unless the whole answer was accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import msgspec

from lepton.agent import enrol, enrol_tls, identity
from lepton.agent.config import AgentConfig, load_config
from lepton.common.errors import ConfigError
from lepton.protocol.enrolment import EnrollRequest, EnrollResponse


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "enroll",
        help="exchange a claim (from `lepton devices enroll`) for this device's identity",
        description="Enrol this device: POST the claim to the coordinator and keep the "
        "identity it answers with (mode 0600) in the state directory.",
    )
    p.add_argument("url", help="the coordinator's URL (https://coordinator.example:8443)")
    p.add_argument("token", help="the claim, lpc_... (used once)")
    p.add_argument("--device-id", default=None, help="default: the config's device.id")
    p.add_argument("--device-class", default=None, help="default: the config's device.class")
    trust = p.add_mutually_exclusive_group()
    trust.add_argument(
        "--ca-sha256", default=None, metavar="sha256:HEX", help="pin of the fleet CA certificate"
    )
    trust.add_argument(
        "--ca-file", type=Path, default=None, help="the fleet CA certificate (PEM) to trust"
    )
    p.add_argument("--config", type=Path, default=None, help="default /etc/lepton/agent.toml")
    p.add_argument("--state-dir", type=Path, default=None, help="default: agent.state_dir")
    p.add_argument("--csr", action="store_true", help="also get a client certificate (mTLS)")
    p.add_argument("--force", action="store_true", help="replace an existing identity")
    p.add_argument(
        "--insecure", action="store_true", help="allow plain http to a non-loopback host"
    )


async def _post(ns: argparse.Namespace, req: EnrollRequest, pin: str | None) -> EnrollResponse:
    import httpx

    verify = await asyncio.to_thread(enrol_tls.verify_for, ns.url, ns.ca_file, pin)
    async with httpx.AsyncClient(
        timeout=httpx.Timeout(30.0), follow_redirects=False, verify=verify
    ) as client:
        return await enrol.request_identity(client, ns.url, ns.token, req)


class _Exit(Exception):  # noqa: N818 - internal control flow, never escapes run()
    def __init__(self, code: int, message: str) -> None:
        self.code = code
        super().__init__(message)


def run(ns: argparse.Namespace) -> int:
    """The command; its exit code."""
    try:
        return _run(ns)
    except _Exit as exc:
        print(f"lepton-agent enroll: {exc}", file=sys.stderr)
        return exc.code


def _setup(ns: argparse.Namespace) -> tuple[str | None, AgentConfig]:
    """The pin and the config (no identity applied); usage errors exit 2."""
    try:
        pin = enrol.parse_pin(ns.ca_sha256) if ns.ca_sha256 else None
        overrides = {"agent.state_dir": ns.state_dir} if ns.state_dir else None
        config = load_config(ns.config, overrides=overrides, identity=False)
        scheme = enrol.check_url(ns.url, insecure=ns.insecure)
    except ValueError as exc:
        raise _Exit(2, str(exc)) from exc
    except ConfigError as exc:
        raise _Exit(2, f"configuration error: {exc}") from exc
    except enrol.EnrolError as exc:
        raise _Exit(2, f"{exc.reason}: {exc.detail}") from exc
    if scheme == "http" and ns.insecure:
        print(
            "lepton-agent enroll: WARNING: --insecure: the claim and this device's new "
            "credentials travel unencrypted; anyone on the path can take them",
            file=sys.stderr,
        )
    existing = identity.identity_path(config.agent.state_dir)
    if existing.exists() and not ns.force:
        raise _Exit(
            1,
            f"{existing} exists: this device is enrolled already. Pass --force to replace "
            "its identity (the old one stops working once the coordinator revokes it)",
        )
    return pin, config


def _run(ns: argparse.Namespace) -> int:
    pin, config = _setup(ns)
    state_dir: Path = config.agent.state_dir
    device_id = ns.device_id or config.device.id
    try:
        csr = enrol.make_csr(device_id) if ns.csr else None
        req = EnrollRequest(
            device_id=device_id,
            device_class=ns.device_class or config.device.class_,
            csr_pem=csr.csr_pem if csr else None,
        )
        resp = asyncio.run(_post(ns, req, pin))
        enrol.check_pin(resp, pin)  # before anything from the answer is used or written
        enrol.check_answer(resp, req)
        enrol.check_certificate(resp, csr)
        written = identity.write_identity(state_dir, resp, key_pem=csr.key_pem if csr else None)
    except enrol.EnrolError as exc:
        code = 2 if exc.reason == "no_cryptography" else 1
        raise _Exit(code, f"refused: {exc.reason}: {exc.detail}") from exc
    except msgspec.ValidationError as exc:  # a --device-id or --device-class out of shape
        raise _Exit(2, f"invalid request: {exc}") from exc
    except ConfigError as exc:  # a CA file that cannot be loaded
        raise _Exit(2, f"configuration error: {exc}") from exc
    except OSError as exc:
        raise _Exit(1, f"cannot write the identity into {state_dir}: {exc}") from exc
    print(f"enrolled {resp.device_id} in fleet {resp.fleet!r}", end="")
    print(f" (group {resp.device_group})" if resp.device_group else "")
    print(f"  coordinator  {resp.coordinator_url}")
    tls = "tls" if resp.mqtt.tls else "no tls"
    print(f"  broker       {resp.mqtt.host}:{resp.mqtt.port} ({tls}) as {resp.mqtt.username}")
    for path in written:
        print(f"  wrote        {path}")
    print("next: start the agent: sudo systemctl enable --now lepton-agent")
    return 0
