"""The wire contract shared by the agent and the coordinator: topics, messages, codec, the
per-kind task contracts (:mod:`~lepton.protocol.tasks`), tensors.

Pure code with no I/O. Neither ``agent`` nor ``coordinator`` is imported from here. It needs
msgspec only, except :mod:`~lepton.protocol.tensors` and :mod:`~lepton.protocol.weights`, which
need numpy (and are imported only where tensors are handled).
"""

from lepton.protocol.codec import MAX_MESSAGE_BYTES, decode, encode
from lepton.protocol.errors import DecodeError, TopicError
from lepton.protocol.messages import SCHEMA_VERSION, Message

__all__ = [
    "MAX_MESSAGE_BYTES",
    "SCHEMA_VERSION",
    "DecodeError",
    "Message",
    "TopicError",
    "decode",
    "encode",
]
