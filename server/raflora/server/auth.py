"""Who may call what: the admin token, enrolment secrets and signed client tokens.

Authentication is on when the server has an admin token (``admin_token`` or
``admin_token_file``); otherwise every check here passes and the server logs a warning at start.
Every call carries gRPC metadata ``authorization: Bearer <credential>``:

* AdminService: the admin token;
* Join: the client's own credential (``rfc1.…``, issued by an admin with
  IssueClientCredential, bound to one client id), or, under open enrolment only, the
  federation's shared enrolment secret, which enrols a client id once: that first join
  returns the id's own credential, and later joins of the id need it (trust on first use).
  The server stores only salted SHA-256 hashes of either (the
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

from raflora.v1.wire import ErrorReason

from .config import check_id
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


CREDENTIAL_PREFIX = "rfc1"


@dataclass(frozen=True)
class ClientClaims:
    """What a client token binds: one client of one federation, at one rank, until expiry."""

    federation_id: str
    client_id: str
    rank: int
    generation: int  # of the federation's enrolment (rotating the shared secret bumps it)
    expires_unix: float
    client_generation: int = 0  # of the client's credential (re-issuing it bumps it)


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
    if len(parts) != 3 or parts[0] != CREDENTIAL_PREFIX or len(credential) > _MAX_TOKEN_CHARS:
        return None
    try:
        body = json.loads(_unb64(parts[1]))
        return _typed(body["f"], str), _typed(body["c"], str)
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError):
        return None


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
            "k": claims.client_generation,
        }
        payload = _b64(json.dumps(body, separators=(",", ":"), sort_keys=True).encode())
        return f"{TOKEN_PREFIX}.{payload}.{self._mac(payload)}"

    def verify(self, token: str, now: float | None = None) -> ClientClaims:
        """The token's claims; UnauthenticatedError if it is malformed, forged or expired."""
        parts = token.split(".")
        if len(token) > _MAX_TOKEN_CHARS or len(parts) != 3 or parts[0] != TOKEN_PREFIX:
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
        self._credentials: dict[str, dict[str, EnrolmentRecord]] = {}
        self._storage: Storage | None = None
        self._write_lock = threading.Lock()  # writes run in worker threads

    # -- enrolment -------------------------------------------------------------------------
    def load(self, storage: Storage, federation_ids: Iterable[str]) -> None:
        """Read each federation's stored enrolment; warn about federations without one."""
        self._storage = storage
        if not self.enabled:
            return
        for federation_id in federation_ids:
            store = storage.federation(federation_id)
            try:
                raw = store.load_enrolment()
                credentials = {
                    c: EnrolmentRecord.from_json(r)
                    for c, r in store.load_client_credentials().items()
                }
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("federation %s: unreadable enrolment records: %s", federation_id, exc)
                continue
            self._credentials[federation_id] = credentials
            if raw is None:
                log.warning(
                    "federation %s has no enrolment record: no client can join it until an "
                    "admin issues client credentials",
                    federation_id,
                )
                continue
            self._records[federation_id] = EnrolmentRecord.from_json(raw)

    def _require_storage(self, field: str) -> Storage:
        if not self.enabled or self._storage is None:
            raise FailedPreconditionError(field, "authentication is off", ErrorReason.AUTH_DISABLED)
        return self._storage

    def configure(self, federation_id: str, *, open_enrolment: bool, secret: str | None) -> str:
        """Set up a new federation's enrolment; returns its shared secret ("" if per-client).

        Blocking file I/O: call it in a thread.
        """
        if not open_enrolment:
            storage = self._require_storage("open_enrolment")
            with self._write_lock:
                previous = self._records.get(federation_id)
                generation = 1 if previous is None else previous.generation + 1
                record = EnrolmentRecord.new(None, generation, open=False)
                storage.federation(federation_id).save_enrolment(asdict(record))
                self._records[federation_id] = record
            return ""
        return self.set_secret(federation_id, secret)

    def set_secret(self, federation_id: str, secret: str | None) -> str:
        """Store (the hash of) a new shared secret: open enrolment. Returns the secret.

        Blocking file I/O: call it in a thread. Bumps the generation, revoking older tokens.
        """
        storage = self._require_storage("enrolment_secret")
        previous = self._records.get(federation_id)
        if previous is not None and not previous.open:
            raise FailedPreconditionError(
                "enrolment_secret",
                f"federation {federation_id!r} enrols clients with per-client credentials only; "
                "use IssueClientCredential",
                ErrorReason.OPEN_ENROLMENT_OFF,
            )
        secret = check_secret_format(secret) if secret else secrets.token_urlsafe(KEY_BYTES)
        with self._write_lock:
            previous = self._records.get(federation_id)
            generation = 1 if previous is None else previous.generation + 1
            record = EnrolmentRecord.new(secret, generation, open=True)
            storage.federation(federation_id).save_enrolment(asdict(record))
            self._records[federation_id] = record
        return secret

    def issue_client_credential(self, federation_id: str, client_id: str) -> str:
        """A new credential that enrols ``client_id`` only; revokes that client's older tokens.

        Blocking file I/O: call it in a thread.
        """
        storage = self._require_storage("client_id")
        credential = new_client_credential(federation_id, client_id)
        with self._write_lock:
            known = self._credentials.setdefault(federation_id, {})
            previous = known.get(client_id)
            generation = 1 if previous is None else previous.generation + 1
            record = EnrolmentRecord.new(credential, generation, open=False)
            storage.federation(federation_id).save_client_credential(client_id, asdict(record))
            known[client_id] = record
        return credential

    def has_secret(self, federation_id: str) -> bool:
        record = self._records.get(federation_id)
        return record is not None and record.open and bool(record.sha256)

    def has_record(self, federation_id: str) -> bool:
        return federation_id in self._records

    def is_open(self, federation_id: str) -> bool:
        record = self._records.get(federation_id)
        return record is not None and record.open

    def secret_matches(self, federation_id: str, secret: str) -> bool:
        record = self._records.get(federation_id)
        return record is not None and record.open and record.matches(secret)

    # -- checks ----------------------------------------------------------------------------
    def _credential(self, metadata: Iterable[tuple[str, Any]] | None) -> str:
        credential = bearer(metadata)
        if credential is None:
            raise UnauthenticatedError(
                "authorization",
                "missing 'Bearer <credential>' metadata",
                ErrorReason.CREDENTIAL_MISSING,
            )
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
                raise PermissionDeniedError(
                    "authorization", "client tokens cannot call admin RPCs", ErrorReason.ADMIN_ONLY
                )
        raise UnauthenticatedError("authorization", "not the admin token", ErrorReason.NOT_ADMIN)

    def enrol(
        self,
        metadata: Iterable[tuple[str, Any]] | None,
        federation_id: str,
        client_id: str,
    ) -> bool:
        """Join's check: may the bearer enrol as ``client_id``? True for a first join under
        open enrolment, which must then :meth:`claim` the id once the join succeeded.

        * the client's own credential always enrols it;
        * under open enrolment the shared secret enrols an id once (trust on first use): the
          join returns the id's new credential, and from then on only that credential (or one
          an admin issues) enrols it, so no other holder of the secret can act as it.

        An unknown federation reads the same as a wrong credential: ids are not revealed.
        """
        if not self.enabled:
            return False
        credential = self._credential(metadata)
        subject = credential_subject(credential)
        if subject is not None:
            known = self._credentials.get(federation_id, {}).get(subject[1])
            if subject[0] == federation_id and known is not None and known.matches(credential):
                if subject[1] != client_id:
                    raise PermissionDeniedError(
                        "client_id",
                        "the client credential enrols another client id",
                        ErrorReason.WRONG_CLIENT,
                    )
                return False
        elif self.secret_matches(federation_id, credential):
            self._check_unclaimed(federation_id, client_id)
            return True
        raise UnauthenticatedError(
            "authorization",
            "enrolment credential not accepted for this federation",
            ErrorReason.ENROLMENT_REJECTED,
        )

    def _check_unclaimed(self, federation_id: str, client_id: str) -> None:
        if client_id in self._credentials.get(federation_id, {}):
            raise PermissionDeniedError(
                "client_id",
                "this client id is enrolled already; join with its client credential",
                ErrorReason.CLIENT_ID_TAKEN,
            )

    def claim(self, federation_id: str, client_id: str) -> str:
        """Open enrolment's first join of ``client_id``: its credential, issued once.

        Blocking file I/O: call it in a thread (the caller serialises first joins).
        """
        check_id("client_id", client_id)
        self._check_unclaimed(federation_id, client_id)
        return self.issue_client_credential(federation_id, client_id)

    def issue(self, federation_id: str, client_id: str, rank: int) -> tuple[str, float]:
        """A client token for a successful join: (token, expiry); ("", 0) when auth is off."""
        if not self.enabled or self._signer is None:
            return "", 0.0
        record = self._records[federation_id]
        credential = self._credentials.get(federation_id, {}).get(client_id)
        expires = time.time() + self.ttl_seconds
        claims = ClientClaims(
            federation_id,
            client_id,
            rank,
            record.generation,
            expires,
            credential.generation if credential is not None else 0,
        )
        return self._signer.issue(claims), expires

    def authenticate(self, metadata: Iterable[tuple[str, Any]] | None) -> ClientClaims | None:
        """The claims of a valid, current client token (None when auth is off)."""
        if not self.enabled or self._signer is None:
            return None
        claims = self._signer.verify(self._credential(metadata))
        record = self._records.get(claims.federation_id)
        credential = self._credentials.get(claims.federation_id, {}).get(claims.client_id)
        client_generation = credential.generation if credential is not None else 0
        if (
            record is None
            or record.generation != claims.generation
            or client_generation != claims.client_generation
        ):
            raise UnauthenticatedError(
                "authorization",
                "client token revoked; join again with the current secret",
                ErrorReason.TOKEN_REVOKED,
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
                "federation_id",
                "the client token was issued for another federation",
                ErrorReason.WRONG_FEDERATION,
            )
        if client_id is not None and claims.client_id != client_id:
            raise PermissionDeniedError(
                "client_id",
                "the client token was issued for another client",
                ErrorReason.WRONG_CLIENT,
            )
        if rank is not None and claims.rank != rank:
            raise PermissionDeniedError(
                "rank",
                f"the client token was issued for rank {claims.rank}, not {rank}; "
                "use the token of the latest join",
                ErrorReason.WRONG_RANK,
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
