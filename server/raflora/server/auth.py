"""Who may call what: the admin token, enrolment secrets and signed client tokens.

Authentication is on when the server has an admin token (``admin_token`` or
``admin_token_file``); otherwise every check here passes and the server logs a warning at start.
Every call carries gRPC metadata ``authorization: Bearer <credential>``:

* AdminService: the admin token;
* Join: the federation's enrolment secret. The server stores only a salted SHA-256 of it (the
  secret is >= 32 characters of high entropy, so a slow password hash would add cost and no
  strength) and answers with a client token;
* Pull, Push, GetRound, WatchRounds: the client token, ``rft1.<payload>.<mac>`` where payload is
  base64url JSON ``{f: federation, c: client id, r: rank, g: secret generation, x: expiry}`` and
  mac its HMAC-SHA256 under the server's token key. Tokens are stateless: rotating a
  federation's secret bumps its generation and so revokes every token issued before.

A missing, malformed, forged, expired or revoked credential is UNAUTHENTICATED; a valid one used
outside what it was issued for is PERMISSION_DENIED. No credential, secret or token is ever
logged or exported as a metric: messages name what is wrong, never the value.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from .storage import Storage

log = logging.getLogger("raflora.server")

AUTHORIZATION = "authorization"
TOKEN_PREFIX = "rft1"
KEY_BYTES = 32
_SECRET_RE = re.compile(r"^[\x21-\x7e]{32,256}$")  # printable ASCII: a valid metadata value
_MAX_TOKEN_CHARS = 2048


@dataclass(frozen=True)
class ClientClaims:
    """What a client token binds: one client of one federation, at one rank, until expiry."""

    federation_id: str
    client_id: str
    rank: int
    generation: int
    expires_unix: float


@dataclass(frozen=True)
class EnrolmentRecord:
    """The stored form of an enrolment secret: a salted hash, never the secret."""

    salt: str
    sha256: str
    generation: int
    created_unix: float

    @classmethod
    def new(cls, secret: str, generation: int) -> EnrolmentRecord:
        salt = secrets.token_hex(16)
        return cls(salt, _salted(salt, secret), generation, time.time())

    def matches(self, secret: str) -> bool:
        return hmac.compare_digest(_salted(self.salt, secret), self.sha256)


def _salted(salt: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode()).hexdigest()


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
        }
        payload = _b64(json.dumps(body, separators=(",", ":"), sort_keys=True).encode())
        return f"{TOKEN_PREFIX}.{payload}.{self._mac(payload)}"

    def verify(self, token: str, now: float | None = None) -> ClientClaims:
        """The token's claims; UnauthenticatedError if it is malformed, forged or expired."""
        parts = token.split(".")
        if len(token) > _MAX_TOKEN_CHARS or len(parts) != 3 or parts[0] != TOKEN_PREFIX:
            raise UnauthenticatedError("authorization", "not a client token")
        _, payload, mac = parts
        if not hmac.compare_digest(self._mac(payload).encode(), mac.encode()):
            raise UnauthenticatedError("authorization", "client token signature is invalid")
        try:
            body = json.loads(_unb64(payload))
            claims = ClientClaims(
                federation_id=_typed(body["f"], str),
                client_id=_typed(body["c"], str),
                rank=_typed(body["r"], int),
                generation=_typed(body["g"], int),
                expires_unix=float(_typed(body["x"], (int, float))),
            )
        except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError):
            raise UnauthenticatedError("authorization", "client token is malformed") from None
        if claims.expires_unix <= (time.time() if now is None else now):
            raise UnauthenticatedError("authorization", "client token expired; join again")
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


def bearer(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The credential of ``authorization: Bearer <credential>``; None when absent."""
    values = [v for k, v in metadata or () if k.lower() == AUTHORIZATION]
    if not values:
        return None
    if len(values) > 1:
        raise UnauthenticatedError("authorization", "more than one authorization header")
    value = values[0]
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    scheme, _, credential = str(value).partition(" ")
    credential = credential.strip()
    if scheme.lower() != "bearer" or not credential:
        raise UnauthenticatedError("authorization", "expected 'Bearer <credential>'")
    return credential


def check_secret_format(secret: str) -> str:
    if not _SECRET_RE.match(secret):
        raise InvalidArgumentError(
            "enrolment_secret", "must be 32 to 256 printable ASCII characters without spaces"
        )
    return secret


class Authority:
    """The server's credentials and the checks of every RPC (all pass when auth is off)."""

    def __init__(self, admin_token: str | None, key: bytes | None, ttl_seconds: float) -> None:
        self.enabled = admin_token is not None
        if self.enabled and key is None:
            raise ValueError("authentication needs a token-signing key")
        self._admin_digest = hashlib.sha256(admin_token.encode()).digest() if admin_token else b""
        self._signer = TokenSigner(key) if key is not None else None
        self.ttl_seconds = ttl_seconds
        self._records: dict[str, EnrolmentRecord] = {}
        self._storage: Storage | None = None
        self._write_lock = threading.Lock()  # rotations run in worker threads

    # -- enrolment secrets -----------------------------------------------------------------
    def load(self, storage: Storage, federation_ids: Iterable[str]) -> None:
        """Read each federation's stored secret hash; warn about federations without one."""
        self._storage = storage
        if not self.enabled:
            return
        for federation_id in federation_ids:
            raw = storage.federation(federation_id).load_enrolment()
            if raw is None:
                log.warning(
                    "federation %s has no enrolment secret: no client can join it until an "
                    "admin calls RotateEnrolmentSecret",
                    federation_id,
                )
                continue
            self._records[federation_id] = EnrolmentRecord(**raw)

    def set_secret(self, federation_id: str, secret: str | None) -> str:
        """Store (the hash of) a new secret for ``federation_id``; returns the secret.

        Blocking file I/O: call it in a thread. Bumps the generation, revoking older tokens.
        """
        if not self.enabled or self._storage is None:
            raise FailedPreconditionError("enrolment_secret", "authentication is off")
        secret = check_secret_format(secret) if secret else secrets.token_urlsafe(KEY_BYTES)
        with self._write_lock:
            previous = self._records.get(federation_id)
            generation = 1 if previous is None else previous.generation + 1
            record = EnrolmentRecord.new(secret, generation)
            self._storage.federation(federation_id).save_enrolment(asdict(record))
            self._records[federation_id] = record
        return secret

    def has_secret(self, federation_id: str) -> bool:
        return federation_id in self._records

    def secret_matches(self, federation_id: str, secret: str) -> bool:
        record = self._records.get(federation_id)
        return record is not None and record.matches(secret)

    # -- checks ----------------------------------------------------------------------------
    def _credential(self, metadata: Iterable[tuple[str, Any]] | None) -> str:
        credential = bearer(metadata)
        if credential is None:
            raise UnauthenticatedError("authorization", "missing 'Bearer <credential>' metadata")
        return credential

    def require_admin(self, metadata: Iterable[tuple[str, Any]] | None) -> None:
        if not self.enabled:
            return
        credential = self._credential(metadata)
        digest = hashlib.sha256(credential.encode()).digest()
        if hmac.compare_digest(digest, self._admin_digest):
            return
        if credential.startswith(f"{TOKEN_PREFIX}.") and self._signer is not None:
            try:
                self._signer.verify(credential)
            except UnauthenticatedError:
                pass
            else:
                raise PermissionDeniedError("authorization", "client tokens cannot call admin RPCs")
        raise UnauthenticatedError("authorization", "not the admin token")

    def enrol(self, metadata: Iterable[tuple[str, Any]] | None, federation_id: str) -> None:
        """Join's check: the bearer must be ``federation_id``'s current enrolment secret.

        An unknown federation reads the same as a wrong secret: ids are not revealed.
        """
        if not self.enabled:
            return
        credential = self._credential(metadata)
        if not self.secret_matches(federation_id, credential):
            raise UnauthenticatedError(
                "authorization", "enrolment secret not accepted for this federation"
            )

    def issue(self, federation_id: str, client_id: str, rank: int) -> tuple[str, float]:
        """A client token for a successful join: (token, expiry); ("", 0) when auth is off."""
        if not self.enabled or self._signer is None:
            return "", 0.0
        record = self._records[federation_id]
        expires = time.time() + self.ttl_seconds
        claims = ClientClaims(federation_id, client_id, rank, record.generation, expires)
        return self._signer.issue(claims), expires

    def authenticate(self, metadata: Iterable[tuple[str, Any]] | None) -> ClientClaims | None:
        """The claims of a valid, current client token (None when auth is off)."""
        if not self.enabled or self._signer is None:
            return None
        claims = self._signer.verify(self._credential(metadata))
        record = self._records.get(claims.federation_id)
        if record is None or record.generation != claims.generation:
            raise UnauthenticatedError(
                "authorization", "client token revoked; join again with the current secret"
            )
        return claims

    @staticmethod
    def authorize(
        claims: ClientClaims | None,
        federation_id: str,
        client_id: str | None = None,
        rank: int | None = None,
    ) -> None:
        """``claims`` must cover ``federation_id`` and, where given, ``client_id`` and ``rank``."""
        if claims is None:
            return
        if claims.federation_id != federation_id:
            raise PermissionDeniedError(
                "federation_id", "the client token was issued for another federation"
            )
        if client_id is not None and claims.client_id != client_id:
            raise PermissionDeniedError(
                "client_id", "the client token was issued for another client"
            )
        if rank is not None and claims.rank != rank:
            raise PermissionDeniedError(
                "rank",
                f"the client token was issued for rank {claims.rank}, not {rank}; "
                "use the token of the latest join",
            )

    def client(
        self,
        metadata: Iterable[tuple[str, Any]] | None,
        federation_id: str,
        client_id: str | None = None,
        rank: int | None = None,
    ) -> ClientClaims | None:
        """Authenticate and authorize a Pull, Push, GetRound or WatchRounds call."""
        claims = self.authenticate(metadata)
        self.authorize(claims, federation_id, client_id, rank)
        return claims
