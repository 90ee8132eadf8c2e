"""The client SDK: what a training job embeds to take part in a federation.

Synchronous on purpose (training loops are), thin (grpcio, protobuf, safetensors, torch), and
never imports the server. Transient failures (UNAVAILABLE, DEADLINE_EXCEEDED) are retried with
exponential backoff and jitter; pushes are idempotent on the server (same checksum), so a retry
after an interrupted upload is never double-counted.

Security (docs/security.md): pass ``credentials=grpc.ssl_channel_credentials(...)`` for TLS (with
a client key and certificate for mutual TLS) and ``enrolment_secret=`` when the server has
authentication on. ``join`` presents the secret and keeps the client token the server returns;
every later call carries that token, and the client joins again by itself when the token is
about to expire, has expired or was revoked, as long as it still holds a valid secret.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import grpc
from google.protobuf import json_format

if TYPE_CHECKING:
    from torch import Tensor

from raflora.v1 import aggregation_pb2 as pb
from raflora.v1 import aggregation_pb2_grpc as pb_grpc
from raflora.v1.framing import data_or_message, serializer
from raflora.v1.wire import (
    DEFAULT_CHUNK_SIZE,
    LORA_A,
    LORA_B,
    MERGE_PREFIX,
    ErrorReason,
    split_tensor_name,
)

from .direct import get_payload, post_payload
from .errors import (
    RETRYABLE,
    DeadlineExceededError,
    FailedPreconditionError,
    RafloraError,
    UnavailableError,
    from_rpc_error,
)
from .payload import PushPayload, receive_adapter

log = logging.getLogger("raflora.client_sdk")
_SERVICE = pb.DESCRIPTOR.services_by_name["AggregationService"].full_name
# A direct push asks for a new grant this long before its URL expires (a slow POST still fits),
# or a quarter of the URL's life when that is shorter.
_GRANT_MARGIN_SECONDS = 120.0
_ADMIN_SERVICE = pb.DESCRIPTOR.services_by_name["AdminService"].full_name

REFRESH_MARGIN_SECONDS = 60.0  # join again this long (at most a quarter of its life) before
# the client token expires


def bearer(credential: str | None) -> Metadata | None:
    """gRPC metadata carrying ``credential`` (None: nothing to send)."""
    return (("authorization", f"Bearer {credential}"),) if credential else None


_REJOIN_REASONS = frozenset({ErrorReason.TOKEN_EXPIRED, ErrorReason.TOKEN_REVOKED})


def _needs_rejoin(error: RafloraError) -> bool:
    """A client token the server no longer takes, which joining again replaces (decided on the
    error's reason, never on its message)."""
    return error.code == grpc.StatusCode.UNAUTHENTICATED and error.reason in _REJOIN_REASONS


T = TypeVar("T")
Metadata = tuple[tuple[str, str], ...]
ProgressCallback = Callable[[int, int], None]
"""Called as ``progress(bytes_done, bytes_total)`` during large transfers."""


@dataclass(frozen=True)
class RetryPolicy:
    """How long a call keeps retrying UNAVAILABLE / DEADLINE_EXCEEDED.

    The default budget (90 s of wall time from the call's start, its tries included) rides
    through a server pod's restart (SIGTERM grace, a new pod, the store's resume) instead of
    failing the training job; a try that runs into its own timeout spends the budget too.
    ``attempts`` caps the tries as well (0: as many as the budget allows; 1: never retry).
    """

    budget_seconds: float = 90.0
    attempts: int = 0
    initial_backoff: float = 0.2
    max_backoff: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.5  # each wait is scaled by a random factor in [1 - jitter, 1 + jitter]

    def delays(self) -> Iterator[float]:
        """Waits before each retry; ends when the budget or the attempts are spent."""
        waited, delay, tries = 0.0, self.initial_backoff, 1
        while (not self.attempts or tries < self.attempts) and waited < self.budget_seconds:
            wait = min(
                self.budget_seconds - waited,
                delay * random.uniform(1 - self.jitter, 1 + self.jitter),
            )
            yield wait
            waited += wait
            delay = min(delay * self.multiplier, self.max_backoff)
            tries += 1


@dataclass(frozen=True)
class JoinInfo:
    round: int
    scale: float
    chunk_size: int
    spec: pb.FederationSpec


@dataclass(frozen=True)
class PulledAdapter:
    """The global adapter at this client's rank, as PEFT-named tensors.

    ``scale * lora_B @ lora_A`` is the client's view of the global update. ``merge`` is set
    only under FLoRA: add ``B @ A`` of each ``<module>.merge.lora_*`` pair to the base weight.
    """

    round: int
    rank: int
    scale: float
    tensors: dict[str, Tensor]
    merge: dict[str, Tensor] | None
    energy: pb.RankEnergy  # of global state ``round`` (empty at round 0)


@dataclass(frozen=True)
class PushResult:
    round: int
    duplicate: bool
    received_bytes: int
    uploads_in_round: int


class RafloraClient:
    """One client of one federation."""

    def __init__(
        self,
        target: str,
        federation_id: str,
        client_id: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        enrolment_secret: str | None = None,
        credential_file: str | Path | None = None,
        token: str | None = None,
        timeout: float = 300.0,
        retry: RetryPolicy | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        """``enrolment_secret``: what ``join`` presents when the server has authentication on:
        this client's own credential (from the federation's admin), or, under open enrolment,
        the federation's shared secret. A first join with the shared secret returns the
        client's own credential; the client keeps it (and writes it to ``credential_file``,
        mode 0600, when given: a restarted job reads it from there) and joins with it from then
        on. ``token``: a client token already issued (then ``join`` is needed only to refresh
        it, which needs the credential)."""
        self.target = target
        self.federation_id = federation_id
        self.client_id = client_id
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.chunk_size = chunk_size
        options = [("grpc.max_receive_message_length", 64 << 20)]
        self.channel = (
            grpc.secure_channel(target, credentials, options)
            if credentials is not None
            else grpc.insecure_channel(target, options)
        )
        self.stub = pb_grpc.AggregationServiceStub(self.channel)
        # Push and Pull carry data messages encoded and decoded without protobuf's copies.
        self._push = self.channel.stream_unary(
            f"/{_SERVICE}/Push",
            request_serializer=serializer(pb.PushRequest),
            response_deserializer=pb.PushResponse.FromString,
        )
        self._pull = self.channel.unary_stream(
            f"/{_SERVICE}/Pull",
            request_serializer=pb.PullRequest.SerializeToString,
            response_deserializer=data_or_message(pb.PullChunk),
        )
        self.rank: int | None = None
        self.scale: float | None = None
        # From the federation's spec at join: DIRECT moves payloads through the bucket.
        self.data_plane: int = pb.DATA_PLANE_GRPC
        self.credential_file = Path(credential_file) if credential_file is not None else None
        if self.credential_file is not None and self.credential_file.exists():
            enrolment_secret = self.credential_file.read_text().strip() or enrolment_secret
        self._enrolment_secret = enrolment_secret
        self.token = token
        self.token_expires_unix = 0.0  # unknown for a token passed in
        self._refresh_margin = REFRESH_MARGIN_SECONDS
        self._join_args: tuple[int, int, float, bool] | None = None

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> RafloraClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- calls -----------------------------------------------------------------------------
    def _token_metadata(self) -> Metadata | None:
        return bearer(self.token)

    def _can_rejoin(self) -> bool:
        return self._enrolment_secret is not None and self._join_args is not None

    def _refresh_if_due(self) -> None:
        """Join again shortly before the token expires (a long upload starts with a live one)."""
        if (
            self.token
            and self.token_expires_unix
            and self._can_rejoin()
            and time.time() > self.token_expires_unix - self._refresh_margin
        ):
            self._rejoin()

    def _rejoin(self) -> None:
        assert self._join_args is not None
        log.info("%s: client token expired or revoked; joining again", self.federation_id)
        rank, num_examples, lora_alpha, observer = self._join_args
        self.join(rank, num_examples, lora_alpha, observer)

    def _call(
        self, fn: Callable[[], T], *, persistent: bool = False, deadline: float | None = None
    ) -> T:
        """Run ``fn``, retrying transient failures; map every other status to a typed error.

        Transient failures are retried per the retry policy — within its budget of wall time
        since the call began, tries included — or, when ``persistent``, until ``deadline``
        (None: for ever) so a watcher outlives a server restart. An expired or revoked token is
        replaced by joining again (at most once a minute, so a long watch survives many token
        lifetimes while a token the server keeps refusing still fails).
        """
        delays = self.retry.delays()
        started = time.monotonic()
        last_rejoin: float | None = None
        self._refresh_if_due()
        while True:
            try:
                return fn()
            except grpc.RpcError as exc:
                error = from_rpc_error(exc)
            except UnavailableError as unavailable:  # a watch that ended; the bucket (direct)
                error = unavailable
            recent = last_rejoin is not None and time.monotonic() - last_rejoin < 60.0
            if not recent and _needs_rejoin(error) and self._can_rejoin():
                last_rejoin = time.monotonic()
                self._rejoin()
                continue
            if error.code not in RETRYABLE:
                raise error from None
            delay = next(delays, None)
            if persistent:
                if deadline is not None and time.monotonic() >= deadline:
                    raise error from None
                delay = self.retry.max_backoff if delay is None else delay
            elif delay is not None:  # the budget is wall time: a try that timed out spent it too
                remaining = self.retry.budget_seconds - (time.monotonic() - started)
                delay = min(delay, remaining) if remaining > 0 else None
            if delay is None:
                log.warning("%s: giving up after the retry budget: %s", self.federation_id, error)
                raise error from None
            log.warning(
                "%s: %s (%s); retrying in %.1fs",
                self.federation_id,
                error.code.name,
                error.reason or "no reason",
                delay,
            )
            time.sleep(delay)

    def join(
        self, rank: int, num_examples: int, lora_alpha: float = 0.0, observer: bool = False
    ) -> JoinInfo:
        """Join (or re-join) the federation at ``rank``; keeps the client token it returns.

        ``observer=True`` (an evaluator or auditor) pulls every round but never pushes: it is
        never selected and does not count towards the round's expected clients.
        """
        request = pb.JoinRequest(
            federation_id=self.federation_id,
            client_id=self.client_id,
            rank=rank,
            num_examples=num_examples,
            lora_alpha=lora_alpha,
            observer=observer,
        )
        secret = bearer(self._enrolment_secret)
        response = self._call_plain(
            lambda: self.stub.Join(request, timeout=self.timeout, metadata=secret)
        )
        self.rank, self.scale = rank, response.scale
        self.data_plane = response.spec.data_plane or pb.DATA_PLANE_GRPC
        self._join_args = (rank, num_examples, lora_alpha, observer)
        if response.client_credential:  # first join under open enrolment: keep the id's own
            self._keep_credential(response.client_credential)
        if response.client_token:
            self.token = response.client_token
            self.token_expires_unix = response.token_expires_unix
            lifetime = response.token_expires_unix - time.time()
            self._refresh_margin = min(REFRESH_MARGIN_SECONDS, max(lifetime, 0.0) / 4)
        self.chunk_size = min(self.chunk_size, response.chunk_size or self.chunk_size)
        log.info(
            "joined federation %s as %s at rank %d%s (round %d)",
            self.federation_id,
            self.client_id,
            rank,
            " (observer)" if observer else "",
            response.status.round,
        )
        return JoinInfo(response.status.round, response.scale, self.chunk_size, response.spec)

    def _keep_credential(self, credential: str) -> None:
        self._enrolment_secret = credential
        if self.credential_file is not None:
            self.credential_file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.credential_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(credential + "\n")

    @property
    def client_credential(self) -> str | None:
        """What this client joins with now (its own credential once one was issued)."""
        return self._enrolment_secret

    def _call_plain(self, fn: Callable[[], T]) -> T:
        """``_call`` without token refresh (for join itself)."""
        delays = self.retry.delays()
        while True:
            try:
                return fn()
            except grpc.RpcError as exc:
                error = from_rpc_error(exc)
                delay = next(delays, None) if error.code in RETRYABLE else None
                if delay is None:
                    raise error from None
                time.sleep(delay)

    def status(self) -> pb.RoundStatus:
        """Where the federation stands, and (``selection``) whether this client may push."""
        request = pb.GetRoundRequest(federation_id=self.federation_id, client_id=self.client_id)
        status: pb.RoundStatus = self._call(
            lambda: self.stub.GetRound(
                request, timeout=self.timeout, metadata=self._token_metadata()
            )
        )
        return status

    def pull(
        self, progress: ProgressCallback | None = None, round: int | None = None
    ) -> PulledAdapter:
        """Download the adapter at this client's rank (checksum-verified).

        ``round`` None means the newest published round; an evaluator that must see every
        round can ask for an older one.
        """
        request = pb.PullRequest(  # the digest last: a view may stream while it is built
            federation_id=self.federation_id,
            client_id=self.client_id,
            round=round,
            digest_last=True,
        )

        def attempt() -> PulledAdapter:
            if self.data_plane == pb.DATA_PLANE_DIRECT:
                download = self.stub.DirectPull(
                    request, timeout=self.timeout, metadata=self._token_metadata()
                )
                with contextlib.closing(get_payload(download, self.timeout)) as body:
                    header, tensors = receive_adapter(body, progress)
            else:
                stream = self._pull(request, timeout=self.timeout, metadata=self._token_metadata())
                header, tensors = receive_adapter(stream, progress)
            merge = {k: v for k, v in tensors.items() if f".{MERGE_PREFIX}" in k}
            lora = {k: v for k, v in tensors.items() if k not in merge}
            return PulledAdapter(
                header.round, header.rank, header.scale, lora, merge or None, header.energy
            )

        return self._call(attempt)

    def push(
        self,
        tensors: Mapping[str, Tensor],
        *,
        round: int,
        num_examples: int,
        lora_alpha: float = 0.0,
        progress: ProgressCallback | None = None,
    ) -> PushResult:
        """Upload this round's factors (PEFT names). Safe to retry: duplicates are detected."""
        if self.rank is None:
            raise FailedPreconditionError(
                "client_id: call join() before push()",
                reason=ErrorReason.NOT_JOINED,
                field="client_id",
            )
        payload = PushPayload(tensors)
        header = pb.PushHeader(
            federation_id=self.federation_id,
            client_id=self.client_id,
            round=round,
            rank=self.rank,
            num_examples=num_examples,
            lora_alpha=lora_alpha,
            total_bytes=payload.total_bytes,
            sha256="",  # the trailer carries it: hashed while it is sent
        )

        def requests() -> Iterator[bytes | pb.PushRequest]:
            yield pb.PushRequest(header=header)
            yield from payload.messages(self.chunk_size, progress)

        if self.data_plane == pb.DATA_PLANE_DIRECT:
            response: pb.PushResponse = self._push_direct(header, payload, progress)
        else:
            response = self._call(
                lambda: self._push(
                    requests(), timeout=self.timeout, metadata=self._token_metadata()
                )
            )
        return PushResult(
            response.round, response.duplicate, response.received_bytes, response.uploads_in_round
        )

    def _push_direct(
        self, header: pb.PushHeader, payload: PushPayload, progress: ProgressCallback | None
    ) -> pb.PushResponse:
        """Grant, POST to the bucket, commit. Retries resume where the last try stopped: a
        payload already posted is only committed again (a commit still running on the server
        answers the retry), a grant is reused for another POST until it nears expiry (each
        grant is one of the round's push attempts), and only a commit that found nothing
        posts anew."""
        grant: pb.DirectUpload | None = None
        renew_after = 0.0
        digest: str | None = None

        def attempt() -> pb.PushResponse:
            nonlocal grant, digest, renew_after
            metadata = self._token_metadata()
            if digest is None and (grant is None or time.time() > renew_after):
                grant = self.stub.BeginDirectPush(header, timeout=self.timeout, metadata=metadata)
                life = grant.expires_unix - time.time()
                renew_after = grant.expires_unix - min(_GRANT_MARGIN_SECONDS, life / 4)
            assert grant is not None
            if digest is None:  # once posted, the URL's expiry no longer matters
                digest = post_payload(
                    grant, payload.pieces, payload.total_bytes, self.timeout, progress
                )
            commit = pb.CommitDirectPushRequest(header=header, upload_id=grant.upload_id)
            commit.header.sha256 = digest
            try:
                response: pb.PushResponse = self.stub.CommitDirectPush(
                    commit, timeout=self.timeout, metadata=metadata
                )
            except grpc.RpcError as exc:
                error = from_rpc_error(exc)
                if error.reason != ErrorReason.UPLOAD_MISSING:
                    raise
                digest = None  # the bucket lost it (or it expired): post again, once more
                raise UnavailableError(
                    error.details, reason=error.reason, field=error.field
                ) from None
            return response

        return self._call(attempt)

    def wait_for_round(self, after_round: int, timeout: float | None = None) -> pb.RoundStatus:
        """Block until a round newer than ``after_round`` is published (watch stream, no polling).

        Under a participation policy it returns once the new round's selection is drawn, so
        the status says whether this client is selected (:func:`is_selected`). Reconnects when
        the server restarts; raises DeadlineExceededError after ``timeout``.
        """
        return self._watch_until(
            after_round,
            lambda s: s.round > after_round and s.selection != pb.SELECTION_PENDING,
            timeout,
            f"no round after {after_round} was published",
        )

    def wait_for_selection(self, round: int, timeout: float | None = None) -> pb.RoundStatus:
        """Block until round ``round``'s selection is drawn (or a later round opened).

        A policy draws a round's selection once the federation's expected clients have joined
        (or at its deadline); until then :meth:`status` says ``SELECTION_PENDING``.
        """
        return self._watch_until(
            max(round, 1) - 1,
            lambda s: s.round > round or (s.round == round and s.selection != pb.SELECTION_PENDING),
            timeout,
            f"round {round}'s selection was not drawn",
        )

    def _watch_until(
        self,
        after_round: int,
        done: Callable[[pb.RoundStatus], bool],
        timeout: float | None,
        what: str,
    ) -> pb.RoundStatus:
        deadline = None if timeout is None else time.monotonic() + timeout
        request = pb.WatchRoundsRequest(
            federation_id=self.federation_id, after_round=after_round, client_id=self.client_id
        )

        def attempt() -> pb.RoundStatus:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            watch = self.stub.WatchRounds(
                request, timeout=remaining, metadata=self._token_metadata()
            )
            for event in watch:
                status: pb.RoundStatus = event.status
                if done(status):
                    return status
            raise _StreamEndedError("watch stream closed")

        try:
            return self._call(attempt, persistent=True, deadline=deadline)
        except DeadlineExceededError as exc:
            raise DeadlineExceededError(
                f"round: {what} within {timeout}s", reason=exc.reason, field="round"
            ) from None


def is_selected(status: pb.RoundStatus) -> bool:
    """May this client push in the open round? False when the federation's participation
    policy left it out (a push is refused with NOT_SELECTED: wait for the next round) or has
    not drawn the round's selection yet (SELECTION_PENDING: see
    :meth:`RafloraClient.wait_for_selection`).
    """
    return status.selection not in (pb.SELECTION_NOT_SELECTED, pb.SELECTION_PENDING)


class _StreamEndedError(UnavailableError):
    """A watch stream that closed without an error (no RPC error): retried like UNAVAILABLE."""


class AdminClient:
    """Creates, inspects, deletes and exports federations (``admin_token`` when the server has
    auth on). Specs are a ``pb.FederationSpec`` or a plain mapping (:meth:`spec_from_mapping`).
    """

    # A plain spec (the federations_file format) names these FederationSpec fields flat.
    _FLAT_FIELDS: ClassVar[dict[str, tuple[str, ...]]] = {
        "round_policy": ("min_clients", "expected_clients", "deadline_seconds", "keep_rounds"),
        "trust": ("max_update_norm", "max_examples_per_client", "max_weight_share", "max_clients"),
    }
    _ENUM_PREFIXES: ClassVar[dict[str, str]] = {
        "scaling_rule": "SCALING_RULE_",
        "weighting": "WEIGHTING_",
        "factor_split": "FACTOR_SPLIT_",
        "data_plane": "DATA_PLANE_",
    }

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        admin_token: str | None = None,
    ) -> None:
        options = [("grpc.max_receive_message_length", 64 << 20)]  # export chunks
        self.channel = (
            grpc.secure_channel(target, credentials, options)
            if credentials is not None
            else grpc.insecure_channel(target, options)
        )
        self.stub = pb_grpc.AdminServiceStub(self.channel)
        self._export = self.channel.unary_stream(
            f"/{_ADMIN_SERVICE}/ExportAdapter",
            request_serializer=pb.ExportAdapterRequest.SerializeToString,
            response_deserializer=data_or_message(pb.PullChunk),
        )
        self._metadata = bearer(admin_token)

    def _call(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    @staticmethod
    def spec_from_mapping(spec: Mapping[str, Any]) -> pb.FederationSpec:
        """A FederationSpec from plain data: an entry of the server's ``federations_file``
        (FederationConfig's fields: ``min_clients``, ``max_update_norm`` … flat, enums by value
        such as ``"rslora"``, strategy options of any JSON type) or the spec's own JSON form
        (``round_policy``, ``trust`` nested; ``SCALING_RULE_RSLORA``). ValueError names the
        first field that is unknown or does not fit."""
        if not isinstance(spec, Mapping):
            raise ValueError(f"spec: expected a mapping, got {type(spec).__name__}")
        data: dict[str, Any] = {}
        known = pb.FederationSpec.DESCRIPTOR.fields_by_name
        json_names = {f.json_name: f.name for f in pb.FederationSpec.DESCRIPTOR.fields}
        flat = {name: group for group, names in AdminClient._FLAT_FIELDS.items() for name in names}
        nested: dict[str, dict[str, Any]] = {}
        for key, value in spec.items():
            if not isinstance(key, str):
                raise ValueError(f"spec: field names are strings, got {key!r}")
            if key in flat:
                nested.setdefault(flat[key], {})[key] = value
                continue
            name = key if key in known else json_names.get(key)
            if name is None:
                raise ValueError(f"{key}: unknown federation spec field")
            data[name] = value
        for group, values in nested.items():
            inner = data.setdefault(group, {})
            if not isinstance(inner, Mapping):
                raise ValueError(f"{group}: expected an object")
            inner = dict(inner)
            if clash := sorted(set(values) & set(inner)):
                raise ValueError(f"{clash[0]}: given both flat and inside {group!r}")
            data[group] = {**inner, **values}
        for name, prefix in AdminClient._ENUM_PREFIXES.items():
            value = data.get(name)
            if isinstance(value, str) and not value.upper().startswith(prefix):
                data[name] = prefix + value.upper()
        options = data.get("strategy_options")
        if isinstance(options, Mapping):
            data["strategy_options"] = {
                str(k): ("true" if v else "false") if isinstance(v, bool) else str(v)
                for k, v in options.items()
            }
        try:
            return json_format.ParseDict(data, pb.FederationSpec())
        except json_format.ParseError as exc:
            raise ValueError(str(exc).splitlines()[0] if str(exc) else "spec: invalid") from None

    def create_federation(
        self,
        spec: pb.FederationSpec | Mapping[str, Any],
        timeout: float = 30.0,
        enrolment_secret: str = "",
        *,
        open_enrolment: bool = False,
    ) -> pb.Federation:
        """Create a federation from a ``pb.FederationSpec`` or a plain mapping (see
        :meth:`spec_from_mapping`; ValueError for a bad one, before any call). With auth on,
        clients join with credentials from :meth:`issue_client_credential`; with
        ``open_enrolment`` the response's ``enrolment_secret`` (chosen here, or generated;
        shown once) enrols each client id once.
        """
        if not isinstance(spec, pb.FederationSpec):
            spec = self.spec_from_mapping(spec)
        request = pb.CreateFederationRequest(
            spec=spec, enrolment_secret=enrolment_secret, open_enrolment=open_enrolment
        )
        federation: pb.Federation = self._call(
            lambda: self.stub.CreateFederation(request, timeout=timeout, metadata=self._metadata)
        )
        return federation

    def get_federation(self, federation_id: str, timeout: float = 30.0) -> pb.Federation:
        request = pb.GetFederationRequest(federation_id=federation_id)
        federation: pb.Federation = self._call(
            lambda: self.stub.GetFederation(request, timeout=timeout, metadata=self._metadata)
        )
        return federation

    def list_federations(self, timeout: float = 30.0) -> list[pb.Federation]:
        request = pb.ListFederationsRequest()
        response: pb.ListFederationsResponse = self._call(
            lambda: self.stub.ListFederations(request, timeout=timeout, metadata=self._metadata)
        )
        return list(response.federations)

    def rotate_enrolment_secret(
        self, federation_id: str, enrolment_secret: str = "", timeout: float = 30.0
    ) -> str:
        """Replace the federation's enrolment secret (revoking every client token issued under
        the old one); returns the new secret."""
        request = pb.RotateEnrolmentSecretRequest(
            federation_id=federation_id, enrolment_secret=enrolment_secret
        )
        response: pb.RotateEnrolmentSecretResponse = self._call(
            lambda: self.stub.RotateEnrolmentSecret(
                request, timeout=timeout, metadata=self._metadata
            )
        )
        return response.enrolment_secret

    def issue_client_credential(
        self, federation_id: str, client_id: str, timeout: float = 30.0
    ) -> str:
        """A credential that enrols ``client_id`` only (it replaces, and revokes the tokens
        of, any earlier one of that id); hand it to that client."""
        request = pb.IssueClientCredentialRequest(federation_id=federation_id, client_id=client_id)
        response: pb.IssueClientCredentialResponse = self._call(
            lambda: self.stub.IssueClientCredential(
                request, timeout=timeout, metadata=self._metadata
            )
        )
        return response.client_credential

    def delete_federation(
        self, federation_id: str, *, archive: bool = False, timeout: float = 60.0
    ) -> str | None:
        """Stop a federation and delete its stored state, or with ``archive`` move it to the
        server's ``<data_dir>/archive/``; returns the archive folder's name (None: deleted).
        Its clients' calls fail with NOT_FOUND from then on; the id can be created again."""
        request = pb.DeleteFederationRequest(federation_id=federation_id, archive=archive)
        response: pb.DeleteFederationResponse = self._call(
            lambda: self.stub.DeleteFederation(request, timeout=timeout, metadata=self._metadata)
        )
        return response.archive or None

    def list_clients(self, federation_id: str, timeout: float = 30.0) -> list[pb.ClientInfo]:
        """The federation's joined clients (by id) with their join-time terms."""
        request = pb.ListClientsRequest(federation_id=federation_id)
        response: pb.ListClientsResponse = self._call(
            lambda: self.stub.ListClients(request, timeout=timeout, metadata=self._metadata)
        )
        return list(response.clients)

    def export_adapter(
        self,
        federation_id: str,
        out_dir: str | Path,
        *,
        rank: int | None = None,
        round: int | None = None,
        base_model: str | None = None,
        timeout: float = 300.0,
    ) -> Path:
        """Write published round ``round`` (None: the newest) at ``rank`` (None: the
        federation's max rank) as a PEFT LoRA adapter directory, loadable with
        ``PeftModel.from_pretrained(base, out_dir)`` (and by servers that read PEFT adapters,
        such as vLLM): ``adapter_config.json`` and ``adapter_model.safetensors``.

        ``base_model`` goes into the config's ``base_model_name_or_path``. The directory is
        written next to ``out_dir`` and renamed into place; an existing ``out_dir`` must be an
        empty directory (FileExistsError otherwise, before anything is downloaded).
        """
        from . import peft_adapter  # imports this module: not at the top

        out = Path(out_dir)
        peft_adapter.check_export_target(out)
        spec = self.get_federation(federation_id, timeout=timeout).spec
        request = pb.ExportAdapterRequest(federation_id=federation_id, rank=rank or 0, round=round)
        header, tensors = self._call(
            lambda: receive_adapter(self._export(request, timeout=timeout, metadata=self._metadata))
        )
        rslora = spec.scaling_rule == pb.SCALING_RULE_RSLORA
        alpha = header.lora_alpha or header.scale * (header.rank**0.5 if rslora else header.rank)
        config = peft_adapter.peft_adapter_config(
            [m.name for m in spec.modules],
            header.rank,
            alpha,
            use_rslora=rslora,
            base_model=base_model,
        )
        metadata = {
            "format": "pt",
            "raflora.federation_id": federation_id,
            "raflora.round": str(header.round),
            "raflora.rank": str(header.rank),
            "raflora.scale": repr(header.scale),
            "raflora.strategy": spec.strategy,
        }
        state = peft_adapter.peft_state_dict(tensors)
        return peft_adapter.write_peft_adapter(out, state, config, metadata)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def lora_state_dict(factors: Mapping[str, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """``{module: (B, A)}``, in the order of ΔW = s·B·A -> PEFT names ``<module>.lora_B.weight``
    and ``<module>.lora_A.weight``. B is (d_out, r), A is (r, d_in); a pair whose inner
    dimensions do not meet (e.g. the old (A, B) order) is refused."""
    out: dict[str, Tensor] = {}
    for module, (B, A) in factors.items():
        r = B.shape[1] if B.dim() == 2 else -1
        # r ≤ both outer dimensions: this also catches the old (A, B) order on square modules.
        if A.dim() != 2 or r != A.shape[0] or not 0 < r <= min(B.shape[0], A.shape[1]):
            raise ValueError(
                f"{module}: expected (B, A) with B (d_out, r) and A (r, d_in), got shapes "
                f"{tuple(B.shape)} and {tuple(A.shape)}"
            )
        out[f"{module}.{LORA_B}.weight"] = B
        out[f"{module}.{LORA_A}.weight"] = A
    return out


def module_factors(tensors: Mapping[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """PEFT-named tensors (a pull's ``tensors``) -> ``{module: (B, A)}``, the inverse of
    :func:`lora_state_dict`. FLoRA's ``merge.`` tensors are left out (see ``PulledAdapter``)."""
    parts: dict[str, dict[str, Tensor]] = {}
    for name, tensor in tensors.items():
        module, factor, merge = split_tensor_name(name)
        if not merge:
            parts.setdefault(module, {})[factor] = tensor
    missing = sorted(m for m, p in parts.items() if len(p) != 2)
    if missing:
        raise ValueError(f"modules without both lora_A and lora_B: {missing}")
    return {m: (p[LORA_B], p[LORA_A]) for m, p in parts.items()}


__all__ = [
    "AdminClient",
    "JoinInfo",
    "ProgressCallback",
    "PulledAdapter",
    "PushResult",
    "RafloraClient",
    "RafloraError",
    "RetryPolicy",
    "lora_state_dict",
    "module_factors",
]
