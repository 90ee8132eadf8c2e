"""Signed, stateless client tokens and the key that signs them.

``rft1.<payload>.<mac>``: payload is base64url JSON ``{f: federation, c: client id, r: rank,
g: enrolment generation, k: client credential generation, x: expiry}`` and mac its HMAC-SHA256
under the server's token key. Bumping a generation revokes every token issued before.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raflora.v1.wire import ErrorReason

from ..errors import UnauthenticatedError

log = logging.getLogger("raflora.server")

TOKEN_PREFIX = "rft1"
KEY_BYTES = 32
MAX_TOKEN_CHARS = 2048


@dataclass(frozen=True)
class ClientClaims:
    """What a client token binds: one client of one federation, at one rank, until expiry."""

    federation_id: str
    client_id: str
    rank: int
    generation: int  # of the federation's enrolment (rotating the shared secret bumps it)
    expires_unix: float
    client_generation: int = 0  # of the client's credential (re-issuing it bumps it)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenSigner:
    def __init__(self, key: bytes) -> None:
        if len(key) < KEY_BYTES:
            raise ValueError(f"the token key needs at least {KEY_BYTES} bytes")
        self._key = key

    def _mac(self, payload: str) -> str:
        return _b64(hmac.new(self._key, payload.encode(), hashlib.sha256).digest())

    def issue(self, claims: ClientClaims) -> str:
        body = {
            "f": claims.federation_id,
            "c": claims.client_id,
            "r": claims.rank,
            "g": claims.generation,
            "x": round(claims.expires_unix, 3),
            "k": claims.client_generation,
        }
        payload = _b64(json.dumps(body, separators=(",", ":"), sort_keys=True).encode())
        return f"{TOKEN_PREFIX}.{payload}.{self._mac(payload)}"

    def verify(self, token: str, now: float | None = None) -> ClientClaims:
        """The token's claims; UnauthenticatedError if it is malformed, forged or expired."""
        parts = token.split(".")
        if len(token) > MAX_TOKEN_CHARS or len(parts) != 3 or parts[0] != TOKEN_PREFIX:
            raise UnauthenticatedError(
                "authorization", "not a client token", ErrorReason.TOKEN_INVALID
            )
        _, payload, mac = parts
        if not hmac.compare_digest(self._mac(payload).encode(), mac.encode()):
            raise UnauthenticatedError(
                "authorization", "client token signature is invalid", ErrorReason.TOKEN_INVALID
            )
        try:
            body = json.loads(_unb64(payload))
            claims = ClientClaims(
                federation_id=_typed(body["f"], str),
                client_id=_typed(body["c"], str),
                rank=_typed(body["r"], int),
                generation=_typed(body["g"], int),
                expires_unix=float(_typed(body["x"], (int, float))),
                client_generation=_typed(body.get("k", 0), int),
            )
        except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError):
            raise UnauthenticatedError(
                "authorization", "client token is malformed", ErrorReason.TOKEN_INVALID
            ) from None
        if claims.expires_unix <= (time.time() if now is None else now):
            raise UnauthenticatedError(
                "authorization", "client token expired; join again", ErrorReason.TOKEN_EXPIRED
            )
        return claims


def _typed(value: Any, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError("unexpected type in token")
    return value


def load_or_create_key(path: Path) -> bytes:
    """The token-signing key at ``path``: 64 hex digits (or >= 32 raw bytes); created if absent.

    A new key is written with mode 0600 and fsynced; an existing one readable by group or others
    is used with a warning (a Kubernetes Secret should be mounted with defaultMode 0400).
    """
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it first: use theirs
            return load_or_create_key(path)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(KEY_BYTES) + "\n")
            f.flush()
            os.fsync(f.fileno())
        log.info("generated a new token-signing key at %s", path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("token key %s is readable by others (mode %o); use 0600", path, mode)
    raw = path.read_bytes().strip()
    try:
        key = bytes.fromhex(raw.decode())
    except (ValueError, UnicodeDecodeError):
        key = raw
    if len(key) < KEY_BYTES:
        raise ValueError(f"token key {path} holds fewer than {KEY_BYTES} bytes")
    return key
