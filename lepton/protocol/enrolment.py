"""The enrolment contract: how a device exchanges a one-time claim for its own identity.

``POST /v1/enroll`` with ``Authorization: Bearer lpc_...`` (a claim made by ``lepton
devices enroll``) and an :class:`EnrollRequest` body, as JSON. The answer (201 Created) is an
:class:`EnrollResponse`: the device's id and fleet, its HTTP token (``lpd_...``: sent as
``Authorization: Bearer`` on every request to the coordinator), its MQTT account, the fleet CA
certificate (PEM) the device verifies the broker and the coordinator with from then on, and,
when it sent a CSR, its client certificate. The agent writes all of it, mode 0600, into its
state directory (``identity.json``, ``fleet-ca.pem``, ``client.crt``).

Refusals are JSON ``{"detail", "reason"}``: 401 ``missing_claim``, ``unknown_claim``,
``claim_used`` (a replay), ``claim_expired``, ``claim_revoked``; 403 ``class_mismatch`` (the
claim is bound to another device class); 409 ``already_enrolled`` (the id belongs to an
enrolled device: a claim never takes over an existing identity); 422 for a malformed body or
CSR; 503 ``broker_unavailable`` when the broker account could not be made (the claim is not
used up).

Pure code: msgspec only, shared by the agent and the coordinator.
"""

from __future__ import annotations

from typing import Annotated, Final

import msgspec
from msgspec import Meta

from lepton.protocol.errors import DecodeError

DeviceId = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"\A[A-Za-z0-9._:-]+\Z")]
ClassName = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"\A[A-Za-z0-9._-]+\Z")]
MAX_PEM_CHARS: Final = 16 * 1024
MAX_RESPONSE_BYTES: Final = 64 * 1024
#: The status of an accepted enrolment (201 Created: a new identity), on both sides.
ENROLLED_STATUS: Final = 201
#: The files the agent keeps in its state directory (each 0600).
IDENTITY_FILE: Final = "identity.json"
CA_FILE: Final = "fleet-ca.pem"
CLIENT_CERT_FILE: Final = "client.crt"
CLIENT_KEY_FILE: Final = "client.key"


class EnrollRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What the device asks for: its id (usually its host name), its class, and optionally a
    PEM certificate signing request whose subject CN is ``device_id`` (for mTLS)."""

    device_id: DeviceId
    device_class: ClassName | None = None
    csr_pem: Annotated[str, Meta(max_length=MAX_PEM_CHARS)] | None = None


class MqttAccount(msgspec.Struct, frozen=True, kw_only=True):
    """Where and as whom the device connects to the broker (username = device id)."""

    host: str
    port: int
    tls: bool
    username: str
    password: str


class EnrollResponse(msgspec.Struct, frozen=True, kw_only=True):
    device_id: str
    fleet: str
    http_token: str
    coordinator_url: str  # where the device fetches blobs and uploads updates
    mqtt: MqttAccount
    ca_pem: str | None = None  # the fleet CA (None: the fleet runs without its own CA)
    cert_pem: str | None = None  # the client certificate, when a CSR was sent
    device_group: str | None = None


def encode_request(req: EnrollRequest) -> bytes:
    return msgspec.json.encode(req)


def decode_response(data: bytes) -> EnrollResponse:
    """The coordinator's answer; :class:`DecodeError` for anything else (oversized, nested
    deeper than the stack allows, not JSON, not the contract)."""
    if len(data) > MAX_RESPONSE_BYTES:
        raise DecodeError("oversized", f"{len(data)} bytes > limit {MAX_RESPONSE_BYTES}")
    try:
        return msgspec.json.decode(data, type=EnrollResponse)
    except RecursionError as exc:
        raise DecodeError("too_deep", "the answer is nested too deeply") from exc
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise DecodeError("invalid", str(exc)[:200]) from exc
