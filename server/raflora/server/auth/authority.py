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

import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict
from typing import Any

from raflora.v1.wire import ErrorReason

from ..config import check_id
from ..errors import (
    FailedPreconditionError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from ..storage import Storage
from .credentials import (
    EnrolmentRecord,
    bearer,
    check_secret_format,
    credential_subject,
    new_client_credential,
)
from .tokens import KEY_BYTES, TOKEN_PREFIX, ClientClaims, TokenSigner

log = logging.getLogger("raflora.server")


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
        self._retired: dict[str, int] = {}  # deleted federation -> its last generation
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
            self._store_enrolment(federation_id, None, open=False, field="open_enrolment")
            return ""
        return self.set_secret(federation_id, secret)

    def _store_enrolment(
        self, federation_id: str, secret: str | None, *, open: bool, field: str
    ) -> None:
        """Write the federation's enrolment record with the next generation (revoking every
        token issued under the previous one)."""
        storage = self._require_storage(field)
        with self._write_lock:
            previous = self._records.get(federation_id)
            generation = (
                self._first_generation(federation_id)
                if previous is None
                else previous.generation + 1
            )
            record = EnrolmentRecord.new(secret, generation, open=open)
            storage.federation(federation_id).save_enrolment(asdict(record))
            self._records[federation_id] = record

    def _first_generation(self, federation_id: str) -> int:
        """A new federation's first generation: the time in ms, not 1, so that one deleted and
        created again under the same id (even across a restart, which forgets the old one)
        never accepts its predecessor's unexpired tokens, which carry the old generation."""
        return max(int(time.time() * 1000), self._retired.get(federation_id, 0) + 1)

    def forget(self, federation_id: str) -> None:
        """A deleted federation: its enrolment secret, client credentials and tokens stop
        working now (its stored records go with its folder)."""
        with self._write_lock:
            record = self._records.pop(federation_id, None)
            self._credentials.pop(federation_id, None)
            if record is not None:
                self._retired[federation_id] = record.generation

    def set_secret(self, federation_id: str, secret: str | None) -> str:
        """Store (the hash of) a new shared secret: open enrolment. Returns the secret.

        Blocking file I/O: call it in a thread. Bumps the generation, revoking older tokens.
        """
        self._require_storage("enrolment_secret")
        previous = self._records.get(federation_id)
        if previous is not None and not previous.open:
            raise FailedPreconditionError(
                "enrolment_secret",
                f"federation {federation_id!r} enrols clients with per-client credentials only; "
                "use IssueClientCredential",
                ErrorReason.OPEN_ENROLMENT_OFF,
            )
        secret = check_secret_format(secret) if secret else secrets.token_urlsafe(KEY_BYTES)
        self._store_enrolment(federation_id, secret, open=True, field="enrolment_secret")
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
        # A federation created while auth was off has no enrolment record: generation 0.
        record = self._records.get(federation_id)
        credential = self._credentials.get(federation_id, {}).get(client_id)
        expires = time.time() + self.ttl_seconds
        claims = ClientClaims(
            federation_id,
            client_id,
            rank,
            record.generation if record is not None else 0,
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
        generation = record.generation if record is not None else 0
        client_generation = credential.generation if credential is not None else 0
        if (
            (record is None and credential is None)
            or generation != claims.generation
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
