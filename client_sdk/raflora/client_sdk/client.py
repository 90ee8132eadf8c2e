"""The client SDK: what a training job embeds to take part in a federation.

Synchronous on purpose (training loops are), thin (grpcio, protobuf, safetensors, torch), and
never imports the server. Transient failures (UNAVAILABLE, DEADLINE_EXCEEDED) are retried with
exponential backoff and jitter; pushes are idempotent on the server (same checksum), so a retry
after an interrupted upload is never double-counted.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar

import grpc
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from raflora.v1 import aggregation_pb2 as pb
from raflora.v1 import aggregation_pb2_grpc as pb_grpc
from raflora.v1.wire import DEFAULT_CHUNK_SIZE, MERGE_PREFIX, iter_chunks

from .errors import RETRYABLE, DataLossError, DeadlineExceededError, RafloraError, from_rpc_error

T = TypeVar("T")
ProgressCallback = Callable[[int, int], None]
"""Called as ``progress(bytes_done, bytes_total)`` during large transfers."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6
    initial_backoff: float = 0.2
    max_backoff: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.5  # each wait is scaled by a random factor in [1 - jitter, 1 + jitter]

    def delays(self) -> Iterator[float]:
        delay = self.initial_backoff
        for _ in range(self.attempts - 1):
            yield delay * random.uniform(1 - self.jitter, 1 + self.jitter)
            delay = min(delay * self.multiplier, self.max_backoff)


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
        timeout: float = 300.0,
        retry: RetryPolicy | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
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
        self.rank: int | None = None
        self.scale: float | None = None

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> RafloraClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- calls -----------------------------------------------------------------------------
    def _call(self, fn: Callable[[], T]) -> T:
        """Run ``fn``, retrying transient failures; map every other status to a typed error."""
        delays = self.retry.delays()
        while True:
            try:
                return fn()
            except grpc.RpcError as exc:
                error = from_rpc_error(exc)
                if error.code not in RETRYABLE:
                    raise error from None
                delay = next(delays, None)
                if delay is None:
                    raise error from None
                time.sleep(delay)

    def join(self, rank: int, num_examples: int, lora_alpha: float = 0.0) -> JoinInfo:
        request = pb.JoinRequest(
            federation_id=self.federation_id,
            client_id=self.client_id,
            rank=rank,
            num_examples=num_examples,
            lora_alpha=lora_alpha,
        )
        response = self._call(lambda: self.stub.Join(request, timeout=self.timeout))
        self.rank, self.scale = rank, response.scale
        self.chunk_size = min(self.chunk_size, response.chunk_size or self.chunk_size)
        return JoinInfo(response.status.round, response.scale, self.chunk_size, response.spec)

    def status(self) -> pb.RoundStatus:
        request = pb.GetRoundRequest(federation_id=self.federation_id)
        status: pb.RoundStatus = self._call(
            lambda: self.stub.GetRound(request, timeout=self.timeout)
        )
        return status

    def pull(self, progress: ProgressCallback | None = None) -> PulledAdapter:
        """Download the newest published adapter at this client's rank (checksum-verified)."""
        request = pb.PullRequest(federation_id=self.federation_id, client_id=self.client_id)

        def attempt() -> PulledAdapter:
            stream = self.stub.Pull(request, timeout=self.timeout)
            header: pb.PullHeader | None = None
            # Hash each chunk as it arrives (overlaps the transfer) and join once at the end:
            # one copy of the payload instead of a growing buffer plus a bytes() copy of it.
            parts: list[bytes] = []
            digest = hashlib.sha256()
            received = 0
            for message in stream:
                if message.WhichOneof("payload") == "header":
                    header = message.header
                    continue
                data = message.data
                parts.append(data)
                digest.update(data)
                received += len(data)
                if progress is not None and header is not None:
                    progress(received, header.total_bytes)
            if header is None or received != header.total_bytes:
                raise DataLossError(f"data: pull ended after {received} bytes")
            if digest.hexdigest() != header.sha256:
                raise DataLossError("sha256: downloaded adapter does not match its checksum")
            payload = b"".join(parts)
            del parts
            tensors = load_safetensors(payload)
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
            raise RafloraError("client_id: call join() before push()")
        payload = save_safetensors({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
        header = pb.PushHeader(
            federation_id=self.federation_id,
            client_id=self.client_id,
            round=round,
            rank=self.rank,
            num_examples=num_examples,
            lora_alpha=lora_alpha,
            total_bytes=len(payload),
            sha256=hashlib.sha256(payload).hexdigest(),
        )

        def requests() -> Iterator[pb.PushRequest]:
            yield pb.PushRequest(header=header)
            sent = 0
            for chunk in iter_chunks(payload, self.chunk_size):
                yield pb.PushRequest(data=chunk)
                sent += len(chunk)
                if progress is not None:
                    progress(sent, len(payload))

        response = self._call(lambda: self.stub.Push(requests(), timeout=self.timeout))
        return PushResult(
            response.round, response.duplicate, response.received_bytes, response.uploads_in_round
        )

    def wait_for_round(self, after_round: int, timeout: float | None = None) -> pb.RoundStatus:
        """Block until a round newer than ``after_round`` is published (watch stream, no polling).

        Reconnects when the server restarts; raises DeadlineExceededError after ``timeout``.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        request = pb.WatchRoundsRequest(federation_id=self.federation_id, after_round=after_round)

        def attempt() -> pb.RoundStatus:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            for event in self.stub.WatchRounds(request, timeout=remaining):
                status: pb.RoundStatus = event.status
                if status.round > after_round:
                    return status
            raise grpc_unavailable()

        try:
            return self._call_until(attempt, deadline)
        except DeadlineExceededError:
            raise DeadlineExceededError(
                f"round: no round after {after_round} was published within {timeout}s"
            ) from None

    def _call_until(self, fn: Callable[[], T], deadline: float | None) -> T:
        """Like _call, but keeps retrying UNAVAILABLE until ``deadline`` (server restarts)."""
        delays = self.retry.delays()
        while True:
            try:
                return fn()
            except grpc.RpcError as exc:
                error = from_rpc_error(exc)
                if error.code not in RETRYABLE or (
                    deadline is not None and time.monotonic() >= deadline
                ):
                    raise error from None
                time.sleep(next(delays, self.retry.max_backoff))


class _StreamEnded(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    """A watch stream that closed without an error: treated as UNAVAILABLE and retried."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "watch stream closed"


def grpc_unavailable() -> grpc.RpcError:
    return _StreamEnded()


class AdminClient:
    """Creates and inspects federations."""

    def __init__(self, target: str, *, credentials: grpc.ChannelCredentials | None = None) -> None:
        self.channel = (
            grpc.secure_channel(target, credentials)
            if credentials is not None
            else grpc.insecure_channel(target)
        )
        self.stub = pb_grpc.AdminServiceStub(self.channel)

    def create_federation(self, spec: pb.FederationSpec, timeout: float = 30.0) -> pb.Federation:
        try:
            federation: pb.Federation = self.stub.CreateFederation(
                pb.CreateFederationRequest(spec=spec), timeout=timeout
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return federation

    def get_federation(self, federation_id: str, timeout: float = 30.0) -> pb.Federation:
        try:
            federation: pb.Federation = self.stub.GetFederation(
                pb.GetFederationRequest(federation_id=federation_id), timeout=timeout
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return federation

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def lora_state_dict(factors: Mapping[str, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """``{module: (A, B)}`` -> PEFT names ``<module>.lora_A.weight`` / ``.lora_B.weight``."""
    out: dict[str, Tensor] = {}
    for module, (A, B) in factors.items():
        out[f"{module}.lora_A.weight"] = A
        out[f"{module}.lora_B.weight"] = B
    return out


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
]
