"""The shape of Lepton's bearer secrets: random, typed by prefix, stored only as hashes.

``lpo_`` an operator token, ``lpd_`` a device's HTTP token, ``lpc_`` an enrolment claim;
then 256 random bits, URL-safe base64. The prefix lets secret scanners (and people) tell
what a leaked string is, and lets the coordinator look in one table only.

The database keeps SHA-256 of the whole string. A slow password hash (bcrypt, scrypt)
protects guessable secrets; these have 256 bits of entropy, so a fast hash loses nothing
and lets every request be checked with one indexed lookup (GitHub and PyPI store their
tokens the same way).
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Final, Literal

Kind = Literal["operator", "device", "claim"]
PREFIX: Final[dict[Kind, str]] = {"operator": "lpo_", "device": "lpd_", "claim": "lpc_"}
#: Longer strings are refused before hashing (a header cannot make us hash megabytes).
MAX_CHARS: Final = 128


def new(kind: Kind) -> str:
    """A fresh secret of ``kind``."""
    return PREFIX[kind] + secrets.token_urlsafe(32)


def kind_of(token: str) -> Kind | None:
    """Which kind ``token`` claims to be by its prefix (None: none of ours)."""
    if len(token) > MAX_CHARS:
        return None
    for kind, prefix in PREFIX.items():
        if token.startswith(prefix) and len(token) > len(prefix):
            return kind
    return None


def digest(token: str) -> str:
    """What the database stores and looks up: SHA-256 of the token, hex."""
    return hashlib.sha256(token.encode()).hexdigest()
