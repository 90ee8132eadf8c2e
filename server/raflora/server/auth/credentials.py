"""Enrolment credentials: the federation's shared secret and each client's own credential.

The server stores only salted SHA-256 hashes of either (they have 256 bits of entropy, so a
slow password hash would add cost and no strength).
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from raflora.v1.wire import ErrorReason

from ..errors import InvalidArgumentError, UnauthenticatedError
from .tokens import KEY_BYTES, MAX_TOKEN_CHARS, _b64, _typed, _unb64

AUTHORIZATION = "authorization"
CREDENTIAL_PREFIX = "rfc1"
_SECRET_RE = re.compile(r"^[\x21-\x7e]{32,256}$")  # printable ASCII: a valid metadata value


@dataclass(frozen=True)
class EnrolmentRecord:
    """The stored form of a credential: a salted hash, never the secret itself.

    For a federation: ``open`` says whether a shared secret may enrol new client ids (open
    enrolment); otherwise only per-client credentials join. For a client: its credential.
    """

    salt: str
    sha256: str
    generation: int
    created_unix: float
    open: bool = True  # records written before per-client credentials were shared secrets

    @classmethod
    def new(cls, secret: str | None, generation: int, *, open: bool = True) -> EnrolmentRecord:
        salt = secrets.token_hex(16)
        digest = _salted(salt, secret) if secret is not None else ""
        return cls(salt, digest, generation, time.time(), open)

    @classmethod
    def from_json(cls, raw: Any) -> EnrolmentRecord:
        if not isinstance(raw, dict):
            raise ValueError("enrolment record is not an object")
        return cls(
            salt=_typed(raw["salt"], str),
            sha256=_typed(raw["sha256"], str),
            generation=_typed(raw["generation"], int),
            created_unix=float(_typed(raw["created_unix"], (int, float))),
            open=bool(raw.get("open", True)),
        )

    def matches(self, secret: str) -> bool:
        if not self.sha256:
            return False
        return hmac.compare_digest(_salted(self.salt, secret), self.sha256)


def new_client_credential(federation_id: str, client_id: str) -> str:
    """``rfc1.<base64url {f, c}>.<256 random bits>``: it names whom it enrols, so a credential
    presented for another client id is told apart from a wrong one."""
    body = _b64(json.dumps({"f": federation_id, "c": client_id}, separators=(",", ":")).encode())
    return f"{CREDENTIAL_PREFIX}.{body}.{secrets.token_urlsafe(KEY_BYTES)}"


def credential_subject(credential: str) -> tuple[str, str] | None:
    """(federation, client id) a client credential names; None for anything else."""
    parts = credential.split(".")
    if len(parts) != 3 or parts[0] != CREDENTIAL_PREFIX or len(credential) > MAX_TOKEN_CHARS:
        return None
    try:
        body = json.loads(_unb64(parts[1]))
        return _typed(body["f"], str), _typed(body["c"], str)
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError):
        return None


def _salted(salt: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode()).hexdigest()


def bearer(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The credential of ``authorization: Bearer <credential>``; None when absent."""
    values = [v for k, v in metadata or () if k.lower() == AUTHORIZATION]
    if not values:
        return None
    if len(values) > 1:
        raise UnauthenticatedError(
            "authorization", "more than one authorization header", ErrorReason.CREDENTIAL_MISSING
        )
    value = values[0]
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    scheme, _, credential = str(value).partition(" ")
    credential = credential.strip()
    if scheme.lower() != "bearer" or not credential:
        raise UnauthenticatedError(
            "authorization", "expected 'Bearer <credential>'", ErrorReason.CREDENTIAL_MISSING
        )
    return credential


def check_secret_format(secret: str) -> str:
    if not _SECRET_RE.match(secret):
        raise InvalidArgumentError(
            "enrolment_secret", "must be 32 to 256 printable ASCII characters without spaces"
        )
    return secret
