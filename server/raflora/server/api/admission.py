"""Fair shares of the server: no caller can hold what every other caller needs.

gRPC's own ``maximum_concurrent_rpcs`` counts health checks too, so one token holding a
thousand idle streams would make the liveness probe fail. Instead the server counts only its
own services' calls, here: a server-wide cap, and caps per caller, where a caller is the client
a *verified* token names (so minting junk tokens buys nothing) or, without one, the peer host.
WatchRounds streams have a smaller cap of their own. Health and reflection are never counted.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from raflora.v1.wire import ErrorReason

from ..auth import Authority, bearer
from ..errors import ResourceExhaustedError, ServiceError

WATCH_METHOD = "WatchRounds"


@dataclass(frozen=True)
class AdmissionLimits:
    max_rpcs: int = 1024  # in flight, server-wide
    max_rpcs_per_client: int = 64  # per authenticated client (federation, client id)
    max_rpcs_per_host: int = 512  # per peer host, for calls without a valid client token
    max_watches_per_client: int = 4
    max_watches_per_host: int = 256


class Ticket:
    """One admitted call; release it exactly once."""

    def __init__(self, admission: Admission, keys: tuple[str, ...]) -> None:
        self._admission = admission
        self._keys = keys
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._admission._release(self._keys)


class Admission:
    def __init__(self, limits: AdmissionLimits, authority: Authority) -> None:
        self.limits = limits
        self.authority = authority
        self._in_flight: Counter[str] = Counter()

    def caller(self, metadata: object, peer: str) -> tuple[str, bool]:
        """(bucket key, whether it is an authenticated client)."""
        try:
            credential = bearer(metadata)  # type: ignore[arg-type]
        except ServiceError:
            credential = None
        if credential is not None and self.authority.enabled:
            try:
                claims = self.authority.authenticate((("authorization", f"Bearer {credential}"),))
            except ServiceError:
                claims = None
            if claims is not None:
                return f"client:{claims.federation_id}/{claims.client_id}", True
        return f"host:{_host(peer)}", False

    def admit(self, method: str, metadata: object, peer: str) -> Ticket:
        key, authenticated = self.caller(metadata, peer)
        per_caller = (
            self.limits.max_rpcs_per_client if authenticated else self.limits.max_rpcs_per_host
        )
        keys = ["*", key]
        caps = [self.limits.max_rpcs, per_caller]
        if method == WATCH_METHOD:
            keys.append(f"watch:{key}")
            caps.append(
                self.limits.max_watches_per_client
                if authenticated
                else self.limits.max_watches_per_host
            )
        for k, cap in zip(keys, caps, strict=True):
            if self._in_flight[k] >= cap:
                who = "the server" if k == "*" else "this caller"
                raise ResourceExhaustedError(
                    "request",
                    f"{who} has {self._in_flight[k]} calls in flight, the limit is {cap}; retry "
                    "once some finish",
                    ErrorReason.TOO_MANY_STREAMS,
                )
        for k in keys:
            self._in_flight[k] += 1
        return Ticket(self, tuple(keys))

    def _release(self, keys: tuple[str, ...]) -> None:
        for k in keys:
            self._in_flight[k] -= 1
            if self._in_flight[k] <= 0:
                del self._in_flight[k]

    def in_flight(self) -> int:
        return self._in_flight["*"]


def _host(peer: str) -> str:
    """``ipv4:127.0.0.1:5555`` → ``127.0.0.1``; ``ipv6:[::1]:5555`` → ``[::1]``."""
    _, _, address = peer.partition(":")
    host, _, _ = address.rpartition(":")
    return host or peer
