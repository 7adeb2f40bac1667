"""Device accounts on the MQTT broker, made and removed at run time (no broker restart).

:class:`BrokerAccounts` is what enrolment calls: ``provision`` when a device is admitted,
``remove`` when it is revoked, ``ensure_ready`` at start-up. Two implementations:

- :class:`DynsecAccounts` drives Mosquitto's dynamic security plugin over the coordinator's
  own MQTT connection (``[mqtt] accounts = "dynsec"``). The coordinator's broker account
  needs the plugin's admin rights: publish to ``$CONTROL/dynamic-security/v1``, subscribe to
  and receive ``$CONTROL/dynamic-security/v1/response`` (``lepton broker init`` writes such
  an account).
- :class:`NoBrokerAccounts` for brokers whose accounts are managed elsewhere
  (``[mqtt] accounts = "none"``): it does nothing and says once that Lepton does not isolate
  devices on that broker.

Why the coordinator's connection (:meth:`MqttLink.add_route`) rather than a dedicated one:
the shipped broker config binds the client id to the username, so a second connection with
the coordinator's account would take over the link's session; a dedicated connection would
need a second admin account, its own TLS, reconnects and credentials. The reply topic's
messages skip the ingest, so device traffic is not touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable
from typing import Any, Protocol

from lepton.common.errors import LeptonError
from lepton.coordinator.auth import dynsec
from lepton.coordinator.errors import UnavailableError
from lepton.protocol import topics

log = logging.getLogger(__name__)


class BrokerAccountsError(LeptonError):
    """The broker did not confirm the change: ``detail`` is its error text, or why no answer
    came (then the change may or may not have been made: calls are idempotent, retry)."""

    def __init__(self, action: str, device_id: str | None, detail: str) -> None:
        self.action = action
        self.device_id = device_id
        self.detail = detail
        who = f" for device {device_id!r}" if device_id else ""
        super().__init__(f"broker accounts: {action}{who} failed: {detail}")


class BrokerAccounts(Protocol):
    """Per-device broker credentials and ACLs."""

    async def provision(self, device_id: str, password: str) -> None:
        """Create the device's account, or reset an existing one to this password (its open
        session, if any, ends). Afterwards the device may publish only under its own device
        topics and read only its own commands. Idempotent."""

    async def remove(self, device_id: str) -> None:
        """Delete the device's account: the broker ends its session and refuses it from then
        on. Idempotent."""

    async def ensure_ready(self) -> None:
        """Raise :class:`BrokerAccountsError` naming what is wrong if accounts cannot be made."""


class ControlLink(Protocol):
    """What :class:`DynsecAccounts` needs from an MQTT connection (``MqttLink`` has it)."""

    def add_route(self, topic: str, handler: Callable[[bytes], None], *, qos: int = 1) -> None: ...

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None: ...

    async def wait_connected(self, timeout: float | None = None) -> bool: ...


class NoBrokerAccounts:
    """Accounts are managed outside Lepton: every call succeeds and changes nothing."""

    def __init__(self) -> None:
        self._warned = False

    def _warn(self) -> None:
        if not self._warned:
            self._warned = True
            log.warning(
                "mqtt.accounts = none: Lepton does not create or remove device accounts on the"
                " broker, so devices are not isolated on it by Lepton (manage the broker's"
                ' accounts and ACLs yourself, or set mqtt.accounts = "dynsec")'
            )

    async def provision(self, device_id: str, password: str) -> None:
        topics.validate_id(device_id)
        self._warn()

    async def remove(self, device_id: str) -> None:
        topics.validate_id(device_id)
        self._warn()

    async def ensure_ready(self) -> None:
        self._warn()


class DynsecAccounts:
    """:class:`BrokerAccounts` through Mosquitto's dynamic security plugin.

    Each call is one control message (all commands of one device together) answered within
    ``timeout_s`` or :class:`BrokerAccountsError`. ``on_reject(reason)`` counts response
    payloads that could not be read (a metric); they are logged and dropped. Calls may run
    concurrently (each waits for its own correlation id). One instance per link: it owns
    the link's route for the plugin's response topic.
    """

    def __init__(
        self,
        link: ControlLink,
        fleet: str,
        *,
        timeout_s: float = 5.0,
        on_reject: Callable[[str], None] | None = None,
    ) -> None:
        self._link = link
        self._fleet = topics.validate_id(fleet, what="fleet")
        self._timeout_s = timeout_s
        self._on_reject = on_reject
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting: dict[str, asyncio.Future[list[dynsec.Reply]]] = {}  # event loop only
        link.add_route(dynsec.RESPONSE_TOPIC, self._on_response)

    async def provision(self, device_id: str, password: str) -> None:
        commands = dynsec.provision_commands(self._fleet, topics.validate_id(device_id), password)
        await self._check_is_device("provision", device_id)
        await self._run("provision", device_id, commands)
        log.info("broker account provisioned for device %s", device_id)

    async def remove(self, device_id: str) -> None:
        commands = dynsec.remove_commands(topics.validate_id(device_id))
        await self._check_is_device("remove", device_id)
        await self._run("remove", device_id, commands)
        log.info("broker account removed for device %s", device_id)

    async def ensure_ready(self) -> None:
        await self._run("check the dynamic security plugin", None, dynsec.probe_commands())

    async def _check_is_device(self, action: str, device_id: str) -> None:
        # A device id may equal the name of the coordinator's or an operator's account; the
        # plugin would let us reset or delete it. One extra round trip rules that out.
        replies = await self._run(action, device_id, [dynsec.get_client_command(device_id)])
        why = dynsec.foreign_account(replies[0], device_id)
        if why is not None:
            raise BrokerAccountsError(action, device_id, why)

    # ------------------------------------------------------------------ one exchange

    async def _run(
        self, action: str, device_id: str | None, commands: list[Any]
    ) -> list[dynsec.Reply]:
        self._loop = asyncio.get_running_loop()
        request_id = secrets.token_hex(12)
        fut: asyncio.Future[list[dynsec.Reply]] = self._loop.create_future()
        if not await self._link.wait_connected(self._timeout_s):
            raise BrokerAccountsError(
                action, device_id, f"not connected to the broker within {self._timeout_s:g}s"
            )
        self._waiting[request_id] = fut
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._link.publish(dynsec.CONTROL_TOPIC, dynsec.encode(commands, request_id))
                replies = await fut
        except TimeoutError:
            raise BrokerAccountsError(
                action,
                device_id,
                f"no answer on {dynsec.RESPONSE_TOPIC} within {self._timeout_s:g}s: is"
                " Mosquitto's dynamic security plugin loaded (plugin"
                " .../mosquitto_dynamic_security.so with plugin_opt_config_file), and does the"
                " coordinator's broker account hold its admin rights on"
                " $CONTROL/dynamic-security/#?",
            ) from None
        except UnavailableError as exc:
            raise BrokerAccountsError(action, device_id, str(exc)) from exc
        finally:
            self._waiting.pop(request_id, None)
        replies = sorted(replies, key=lambda r: r.index)
        failed = [r for r in replies if not r.ok]
        if failed:
            detail = "; ".join(f"{r.command}: {r.error}" for r in failed)
            raise BrokerAccountsError(action, device_id, f"the broker answered {detail}")
        if len(replies) != len(commands):
            raise BrokerAccountsError(
                action, device_id, f"{len(replies)} answers to {len(commands)} commands"
            )
        return replies

    def _on_response(self, payload: bytes) -> None:  # paho's network thread
        try:
            by_request = dynsec.decode(payload)
        except dynsec.BadResponseError as exc:
            log.warning("dropped a message on %s: %s", dynsec.RESPONSE_TOPIC, exc)
            if self._on_reject is not None:
                self._on_reject("dynsec_response")
            return
        loop = self._loop
        if by_request and loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._deliver, by_request)

    def _deliver(self, by_request: dict[str, list[dynsec.Reply]]) -> None:  # event loop
        for request_id, replies in by_request.items():
            fut = self._waiting.get(request_id)
            if fut is not None and not fut.done():
                fut.set_result(replies)


def make_broker_accounts(
    kind: str,
    link: ControlLink,
    fleet: str,
    *,
    timeout_s: float = 5.0,
    on_reject: Callable[[str], None] | None = None,
) -> BrokerAccounts:
    """The implementation ``[mqtt] accounts`` names: ``"dynsec"`` or ``"none"``."""
    if kind == "dynsec":
        return DynsecAccounts(link, fleet, timeout_s=timeout_s, on_reject=on_reject)
    if kind == "none":
        return NoBrokerAccounts()
    raise ValueError(f"unknown broker accounts kind {kind!r} (dynsec or none)")
