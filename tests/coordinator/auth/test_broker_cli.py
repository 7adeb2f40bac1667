"""``lepton broker init``: its files boot a real mosquitto, the coordinator's account works
from the coordinator's own configuration, and devices it provisions are confined."""

from __future__ import annotations

import asyncio
import getpass
import json
import stat
from pathlib import Path

import pytest

from lepton.coordinator.auth.broker_accounts import DynsecAccounts, make_broker_accounts
from lepton.coordinator.auth.broker_config import password_hash
from lepton.coordinator.cli.main import main
from lepton.coordinator.config import load
from lepton.coordinator.runtime.mqtt import MqttLink
from lepton.protocol import topics
from tests.coordinator.auth.conftest import Device, Seen
from tests.support.broker import free_port
from tests.support.secure_stack import InitBroker, listener_port


def init(tmp_path: Path, *extra: str) -> tuple[int, Path]:
    port = free_port()
    rc = main(
        [
            *("broker", "init", "--dir", str(tmp_path / "b"), "--fleet", "f1"),
            *("--port", str(port), "--run-as", getpass.getuser(), *extra),
        ]
    )
    return rc, tmp_path / "b"


async def test_init_boots_a_broker_the_coordinator_drives(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, folder = init(tmp_path)
    assert rc == 0
    out = capsys.readouterr().out
    assert "password_file" in out
    assert 'accounts = "dynsec"' in out
    for name in ("dynamic-security.json", "coordinator.password"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600
    password = (folder / "coordinator.password").read_text().strip()
    assert password not in out  # shown only with --print-password
    toml = tmp_path / "coordinator.toml"
    broker = InitBroker(workdir=folder, port=listener_port(folder))
    toml.write_text(
        f'fleet = "f1"\n[mqtt]\nport = {broker.port}\nusername = "coordinator"\n'
        f'password_file = "{folder / "coordinator.password"}"\naccounts = "dynsec"\n'
    )
    cfg = load(toml, env={})
    assert cfg.mqtt.password == password
    broker.start()
    try:
        seen = Seen()
        link = MqttLink(
            cfg.mqtt,
            client_id=cfg.mqtt_client_id,
            subscriptions=[(topics.device_filter("f1", "#"), 1)],
            on_message=seen,
        )
        accounts = make_broker_accounts(cfg.mqtt.accounts, link, cfg.fleet)
        assert isinstance(accounts, DynsecAccounts)
        async with link:
            await accounts.ensure_ready()
            await accounts.provision("dev-a", "pw-a")
            dev = Device(broker.port, "dev-a", "pw-a")
            try:
                assert dev.connect()
                assert dev.subscribe(topics.cmd_filter("f1", "dev-a")) < 0x80
                await asyncio.to_thread(dev.publish, topics.device_topic("f1", "dev-a", "state"))
                await link.publish(topics.cmd_topic("f1", "dev-a", "task"), b"t")
                async with asyncio.timeout(5):
                    while not (seen.topics and dev.messages):
                        await asyncio.sleep(0.02)
            finally:
                dev.close()
        assert seen.topics == [topics.device_topic("f1", "dev-a", "state")]
        assert dev.messages == [topics.cmd_topic("f1", "dev-a", "task")]
        # Nobody else: no anonymous access, and the coordinator's password is required.
        assert not Device(broker.port, "coordinator", "wrong").connect()
    finally:
        broker.kill()


def test_init_refuses_to_overwrite_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert init(tmp_path)[0] == 0
    first = (tmp_path / "b" / "coordinator.password").read_text()
    rc, _ = init(tmp_path)
    assert rc == 2
    assert "--force" in capsys.readouterr().err
    assert (tmp_path / "b" / "coordinator.password").read_text() == first
    assert init(tmp_path, "--force", "--print-password")[0] == 0
    second = (tmp_path / "b" / "coordinator.password").read_text()
    assert second != first
    assert second.strip() in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["--fleet", "a/#"], "fleet may hold only"),
        (["--fleet", "f1", "--coordinator-user", "x y"], "coordinator user"),
        (["--fleet", "f1", "--tls-port", "8883"], "needs cafile, certfile and keyfile"),
        (["--fleet", "f1", "--port", "0"], "needs a TLS listener"),
        (["--fleet", "f1", "--plugin", ""], None),
    ],
)
def test_init_rejects_bad_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], why: str | None
) -> None:
    rc = main(["broker", "init", "--dir", str(tmp_path / "b"), *args])
    if why is None:  # an empty --plugin means "find it": succeeds on this machine
        assert rc == 0
        return
    assert rc == 2
    assert why in capsys.readouterr().err
    assert not (tmp_path / "b" / "dynamic-security.json").exists()


def test_init_writes_a_tls_listener(tmp_path: Path) -> None:
    files = [tmp_path / n for n in ("ca.crt", "b.crt", "b.key")]
    rc, folder = init(
        tmp_path,
        "--tls-port",
        "8883",
        *[
            x
            for flag, f in zip(("--cafile", "--certfile", "--keyfile"), files, strict=True)
            for x in (flag, str(f))
        ],
    )
    assert rc == 0
    conf = (folder / "mosquitto.conf").read_text()
    tls = conf.split("listener 8883", 1)[1]
    assert "use_username_as_clientid true" in tls
    for f in files:
        assert str(f) in tls


def test_init_port_zero_writes_the_tls_listener_only(tmp_path: Path) -> None:
    files = [tmp_path / n for n in ("ca.crt", "b.crt", "b.key")]
    rc = main(
        [
            *("broker", "init", "--dir", str(tmp_path / "b"), "--fleet", "f1", "--port", "0"),
            *("--tls-port", "8883", "--tls-bind", "127.0.0.1", "--run-as", getpass.getuser()),
            *("--cafile", str(files[0]), "--certfile", str(files[1]), "--keyfile", str(files[2])),
        ]
    )
    assert rc == 0
    conf = (tmp_path / "b" / "mosquitto.conf").read_text()
    listeners = [line for line in conf.splitlines() if line.startswith("listener ")]
    assert listeners == ["listener 8883 127.0.0.1"]
    assert conf.count("use_username_as_clientid true") == 1


def test_password_hash_matches_mosquitto_ctrl_format(tmp_path: Path) -> None:
    """Same fields, salt and key lengths as a file ``mosquitto_ctrl dynsec init`` writes."""
    import base64
    import subprocess

    ref = tmp_path / "ref.json"
    subprocess.run(
        ["mosquitto_ctrl", "dynsec", "init", str(ref), "admin", "pw"],
        check=True,
        capture_output=True,
    )
    theirs = json.loads(ref.read_text())["clients"][0]
    ours = password_hash("pw")
    assert set(ours) <= set(theirs)
    for key in ("password", "salt"):
        assert len(base64.b64decode(ours[key])) == len(base64.b64decode(theirs[key]))
    # Same password, their salt and iterations: the same hash.
    salt = base64.b64decode(theirs["salt"])
    assert theirs["iterations"] == ours["iterations"]
    assert password_hash("pw", salt)["password"] == theirs["password"]


def _tls_files(folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a broker certificate for 127.0.0.1 (cryptography)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test fleet CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    paths = (folder / "ca.crt", folder / "broker.crt", folder / "broker.key")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


async def test_init_tls_listener_takes_provisioned_devices(tmp_path: Path) -> None:
    import ssl

    ca, crt, key = _tls_files(tmp_path / "certs")
    tls_port = free_port()
    rc, folder = init(
        tmp_path,
        *("--tls-port", str(tls_port), "--cafile", str(ca), "--certfile", str(crt)),
        *("--keyfile", str(key)),
    )
    assert rc == 0
    broker = InitBroker(workdir=folder, port=listener_port(folder))
    broker.start()
    try:
        password = (folder / "coordinator.password").read_text().strip()
        cfg = load(
            None,
            env={},
            overrides={"mqtt.port": broker.port, "mqtt.username": "coordinator"}
            | {"mqtt.password": password, "fleet": "f1"},
        )
        link = MqttLink(cfg.mqtt, client_id="coordinator", subscriptions=[], on_message=Seen())
        async with link:
            accounts = DynsecAccounts(link, "f1")
            await accounts.provision("dev-a", "pw-a")
        dev = Device(tls_port, "dev-a", "pw-a")
        dev.client.tls_set(ca_certs=str(ca), cert_reqs=ssl.CERT_REQUIRED)
        try:
            assert dev.connect()
            assert dev.subscribe(topics.cmd_filter("f1", "dev-a")) < 0x80
            assert dev.subscribe("#") >= 0x80
        finally:
            dev.close()
    finally:
        broker.kill()
