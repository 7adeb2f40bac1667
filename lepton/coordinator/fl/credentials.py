"""Upload credentials: who may fill a round's update slot.

A device's right to upload comes from the slot it was given, ``(job, round, device)``: its
credential is an HMAC-SHA256 of the slot under a coordinator secret (kept in the database,
``fl_keys``, so every replica shares it). Nothing secret is stored with the task or the
round; the credential is computed when the train task's message is sent
(:meth:`UploadSigner.seal`, a store dispatch hook), travels only in that message on the
device's own command topic, and comes back in the upload's ``Authorization: Bearer``
header, checked against the slot the upload URL names. So task views, job views, results
and logs (URLs included) never hold it, and a credential of one slot opens no other.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from typing import Final

import msgspec

from lepton.coordinator.fl.jobs import planning
from lepton.protocol.messages import Task

#: The database name of the upload credential key.
KEY_NAME: Final = "fl-upload-v1"
KEY_BYTES: Final = 32
#: What a round records per selected device in place of a secret: how its uploads are
#: authorised.
SCHEME: Final = "hmac-sha256-v1"


@dataclass(frozen=True, slots=True)
class UploadSigner:
    """Makes and checks the upload credentials of update slots."""

    key: bytes

    def __post_init__(self) -> None:
        if len(self.key) < 16:
            raise ValueError("the upload key must be at least 16 bytes")

    def __repr__(self) -> str:  # the key never reaches a log line
        return "UploadSigner(key=***)"

    def token(self, job_id: str, round_no: int, device_id: str) -> str:
        """The credential of slot ``(job_id, round_no, device_id)``."""
        slot = f"{job_id}\x00{round_no}\x00{device_id}".encode()
        mac = hmac.new(self.key, slot, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    def verify(self, job_id: str, round_no: int, device_id: str, token: str) -> bool:
        """Whether ``token`` is the credential of exactly this slot (constant time)."""
        expected = self.token(job_id, round_no, device_id)
        return hmac.compare_digest(expected.encode(), token.encode(errors="replace"))

    def seal(self, message: Task, device_id: str) -> Task:
        """Dispatch hook for ``train`` tasks: the message with its slot's credential added
        to ``upload``, for the federated engine's own tasks (task id derived from the slot,
        :func:`~.planning.task_id`); any other message unchanged."""
        params = message.params
        job, round_no, upload = params.get("job"), params.get("round"), params.get("upload")
        if not (
            isinstance(job, str)
            and isinstance(round_no, int)
            and not isinstance(round_no, bool)
            and isinstance(upload, dict)
        ):
            return message
        if message.task_id != planning.task_id(job, round_no, device_id):
            return message
        token = self.token(job, round_no, device_id)
        sealed = {**params, "upload": {**upload, "token": token}}
        return msgspec.structs.replace(message, params=sealed)
