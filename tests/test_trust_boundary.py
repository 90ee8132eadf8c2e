"""A hostile participant against the real server: attacks across the trust boundary.

Every attack drives the real gRPC server on loopback (in-process with ``threaded_server``, or
as a child process with ``start_server_process`` where a crash and a restart are part of the
attack) through the SDK or raw gRPC stubs. Every row asserts the refusal's status code and its
stable reason, that nothing of the attack was counted or aggregated, and that an honest client
is still served (its push or pull succeeds, the round publishes without the attacker).

Cases are pytest items (parametrised rows counted one by one); the composite items run
several attacks in sequence, listed in brackets.

| attack class                                                                 | cases | xfail |
|------------------------------------------------------------------------------|-------|-------|
| 1. poison uploads: fp64 1e300 (fp32 overflow), fp32 1e38 at scale 32, norm   |    11 |     0 |
|    above trust.max_update_norm, NaN, fp16 Inf, push alpha 1e300, join alpha  |       |       |
|    5e-324 / 1e300 / NaN / negative (10 rows); crash + restart (1)            |       |       |
| 2. identity: per-client credentials (8 rows: wrong client, forged x2, other  |    20 |     0 |
|    federation, token, secret, admin token, none); TOFU squatting under open  |       |       |
|    enrolment (8 rows: re-join, rank change, own credential, push/pull/watch  |       |       |
|    with own or edited token); concurrent first joins; secret rotation;       |       |       |
|    credential re-issue; credential for a federation made while auth was off  |       |       |
| 3. weight: push num_examples 2^63-1 / 2^64-1 / 0, join above                 |     6 |     0 |
|    trust.max_examples_per_client / 2^64-1 (5 rows); max_weight_share cap (1) |       |       |
| 4. resource starvation: one token [watch cap, per-client cap, server-wide    |     3 |     0 |
|    cap, header timeout, slot release]; per-host cap with auth off; the       |       |       |
|    header-timeout message                                                    |       |       |
| 5. stored bytes: one server process restarted [bit flip in an acked upload,  |    10 |     0 |
|    in the newest state, in an older state, garbage upload record, lost       |       |       |
|    manifest]; garbage upload/client records (8 rows); corrupt cached view    |       |       |
| 6. races: push streaming across the close [+ duplicate re-push]; a watcher   |     4 |     0 |
|    that never reads; newest-round and old-round pulls racing publications    |       |       |
| 7. small: 17 KiB and newline ids, absurd specs (13 rows); one client cycling |    16 |     0 |
|    60 alphas; many clients cycling alphas; an emoji tensor name              |       |       |
| total                                                                        |    70 |     0 |

Bugs that an attack exposes stay here as ``xfail(strict=True, reason="BUG: ...")``; the
seven this suite found first (join INTERNAL without an enrolment record, the header-timeout
message, deeply nested JSON records dropping a federation, view builds racing a prune, views
past the per-round cap left on disk, error trailers over gRPC's metadata limit) are fixed.
The machine running this is small: every loop is bounded, every stream has a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import save

from raflora.client_sdk import (
    AdminClient,
    PulledAdapter,
    RafloraClient,
    RafloraError,
    RetryPolicy,
    lora_state_dict,
    pb,
)
from raflora.client_sdk.errors import from_rpc_error
from raflora.server.engine import AdapterSchema
from raflora.server.rounds import EventType, RoundEvent
from raflora.server.storage import FileFederationStore
from raflora.server.testing import (
    ServerProcess,
    ThreadedServer,
    federation_spec,
    scrape,
    start_server_process,
    threaded_server,
)
from raflora.v1 import aggregation_pb2_grpc as pb_grpc
from raflora.v1.wire import ErrorReason, iter_chunks, sha256_hex

ADMIN_TOKEN = "trust-boundary-admin-token-0123456789"
MODULES = {"m0": (16, 12), "m1": (8, 20)}
NO_RETRY = RetryPolicy(attempts=1)
C = grpc.StatusCode
R = ErrorReason
Tensors = dict[str, torch.Tensor]
Metadata = tuple[tuple[str, str], ...]


# -- helpers ----------------------------------------------------------------------------------


def adapter(
    rank: int, seed: int, *, gain: float = 0.05, dtype: torch.dtype = torch.float32
) -> Tensors:
    """A well-formed upload: small factors, so ‖s·B·A‖_F stays far below a bound of 10."""
    g = torch.Generator().manual_seed(seed)
    pairs = {
        m: (
            (torch.randn(d_out, rank, generator=g) * gain).to(dtype),
            (torch.randn(rank, d_in, generator=g) * gain).to(dtype),
        )
        for m, (d_out, d_in) in MODULES.items()
    }
    tensors: Tensors = lora_state_dict(pairs)
    return tensors


def poisoned(
    rank: int,
    seed: int,
    name: str,
    index: tuple[int, int],
    value: float,
    dtype: torch.dtype = torch.float32,
) -> Tensors:
    tensors = adapter(rank, seed, dtype=dtype)
    tensors[name][index] = value
    return tensors


def spec(fid: str, *, clients: int = 2, **extra: Any) -> pb.FederationSpec:
    """A federation whose rounds close when ``clients`` uploads are in."""
    extra.setdefault("max_rank", 8)
    return federation_spec(fid, MODULES, min_clients=clients, expected_clients=clients, **extra)


def refused(action: Callable[[], object], what: str = "the attack") -> RafloraError:
    """The typed error ``action`` ends with (SDK or raw stub); fails the test if it succeeds."""
    try:
        action()
    except RafloraError as exc:
        return exc
    except grpc.RpcError as exc:
        return from_rpc_error(exc)
    pytest.fail(f"{what} was accepted")


def check(
    error: RafloraError, code: grpc.StatusCode, reason: str | None, field: str | None = None
) -> None:
    got = (error.code, error.reason)
    assert got == (code, reason), f"{got} != {(code, reason)}: {error.details}"
    if field is not None:
        assert error.field == field, f"field {error.field!r} != {field!r}: {error.details}"


def bearer(token: str | None) -> Metadata | None:
    return (("authorization", f"Bearer {token}"),) if token else None


def stub_of(channel: grpc.Channel) -> Any:
    return pb_grpc.AggregationServiceStub(channel)


def push_requests(
    fid: str,
    cid: str,
    payload: bytes,
    *,
    rank: int,
    num_examples: int = 10,
    round_: int = 0,
    chunk: int = 4096,
) -> list[pb.PushRequest]:
    header = pb.PushHeader(
        federation_id=fid,
        client_id=cid,
        round=round_,
        rank=rank,
        num_examples=num_examples,
        total_bytes=len(payload),
        sha256=sha256_hex(payload),
    )
    return [pb.PushRequest(header=header)] + [
        pb.PushRequest(data=c) for c in iter_chunks(payload, chunk)
    ]


def metric(url: str, name: str, **labels: str) -> float:
    """One sample of a fresh /metrics scrape (0 when the series does not exist yet)."""
    for family in text_string_to_metric_families(scrape(url)):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


def health(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
    status: int = reply.status
    return status


SERVING = health_pb2.HealthCheckResponse.SERVING


def finite(pulled: PulledAdapter) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in pulled.tensors.values())


def store_of(data_dir: Path, fid: str) -> FileFederationStore:
    return FileFederationStore(data_dir / "federations" / fid)


def manifest_clients(data_dir: Path, fid: str, round_: int) -> list[str]:
    return sorted(u.client_id for u in store_of(data_dir, fid).read_manifest(round_).uploads)


def staged(data_dir: Path, fid: str, round_: int = 0) -> list[str]:
    folder = data_dir / "federations" / fid / "uploads" / f"{round_:08d}"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def wait_for(what: str, predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def flip_bit(path: Path, from_end: int = 3) -> None:
    """Flip one bit in the data section (the safetensors header still parses)."""
    data = bytearray(path.read_bytes())
    data[len(data) - from_end] ^= 0x10
    path.write_bytes(bytes(data))


class Clients:
    """SDK clients of one server, closed with the stack; no retries (an attack's status shows)."""

    def __init__(self, stack: ExitStack, target: str) -> None:
        self.stack = stack
        self.target = target

    def __call__(self, fid: str, cid: str, secret: str | None = None) -> RafloraClient:
        return self.stack.enter_context(
            RafloraClient(self.target, fid, cid, enrolment_secret=secret, retry=NO_RETRY)
        )


# -- 1 and 3. poison uploads and weights: one runner, one table each --------------------------


@dataclass(frozen=True)
class Attack:
    """One hostile client's join (and push) against a round two honest clients complete."""

    name: str
    code: grpc.StatusCode
    reason: str
    field: str
    join_examples: int = 10
    join_alpha: float = 0.0
    tensors: Callable[[], Tensors] | None = None  # None: the join itself is the attack
    push_examples: int = 10
    push_alpha: float = 0.0


POISON_TRUST = pb.TrustPolicy(max_update_norm=10.0)
WEIGHT_TRUST = pb.TrustPolicy(max_examples_per_client=1000)
BAD = (C.INVALID_ARGUMENT, R.INVALID_UPDATE)
BAD_FIELD = (C.INVALID_ARGUMENT, R.INVALID_FIELD)  # a declared setting or id
FIELD = (C.INVALID_ARGUMENT, R.INVALID_FIELD)

POISON = [
    Attack(
        "fp64-1e300-overflows-fp32",
        *BAD,
        "m0.lora_A.weight",
        tensors=lambda: poisoned(2, 11, "m0.lora_A.weight", (0, 0), 1e300, torch.float64),
    ),
    Attack(  # finite in fp32, 3.2e39 once multiplied by s = 64 / 2
        "fp32-1e38-B-at-scale-32",
        *BAD,
        "m0.lora_B.weight",
        join_alpha=64.0,
        tensors=lambda: poisoned(2, 12, "m0.lora_B.weight", (0, 0), 1e38),
    ),
    Attack(  # ‖s·B·A‖_F ≈ 600 against the federation's bound of 10; every element modest
        "norm-above-max_update_norm", *BAD, "m0", tensors=lambda: adapter(2, 13, gain=2.0)
    ),
    Attack(
        "nan",
        *BAD,
        "m1.lora_A.weight",
        tensors=lambda: poisoned(2, 14, "m1.lora_A.weight", (1, 3), math.nan),
    ),
    Attack(
        "fp16-inf",
        *BAD,
        "m0.lora_B.weight",
        tensors=lambda: poisoned(2, 15, "m0.lora_B.weight", (2, 1), math.inf, torch.float16),
    ),
    Attack(
        "push-lora_alpha-1e300",
        *FIELD,
        "lora_alpha",
        tensors=lambda: adapter(2, 16),
        push_alpha=1e300,
    ),
    Attack("join-lora_alpha-5e-324", *FIELD, "lora_alpha", join_alpha=5e-324),
    Attack("join-lora_alpha-1e300", *FIELD, "lora_alpha", join_alpha=1e300),
    Attack("join-lora_alpha-nan", *FIELD, "lora_alpha", join_alpha=math.nan),
    Attack("join-lora_alpha-negative", *FIELD, "lora_alpha", join_alpha=-16.0),
]

WEIGHT = [
    Attack(
        "push-num_examples-2^63-1",
        *FIELD,
        "num_examples",
        tensors=lambda: adapter(2, 21),
        push_examples=2**63 - 1,
    ),
    Attack(
        "push-num_examples-2^64-1",
        *FIELD,
        "num_examples",
        tensors=lambda: adapter(2, 22),
        push_examples=2**64 - 1,
    ),
    Attack(
        "push-num_examples-0",
        *FIELD,
        "num_examples",
        tensors=lambda: adapter(2, 23),
        push_examples=0,
    ),
    Attack("join-num_examples-above-trust-max", *FIELD, "num_examples", join_examples=1001),
    Attack("join-num_examples-2^64-1", *FIELD, "num_examples", join_examples=2**64 - 1),
]


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    """Authentication off: the attacks of classes 1, 3, 6 and 7 need no credentials."""
    with threaded_server(tmp_path_factory.mktemp("open"), max_pushes_per_round=64) as handle:
        yield handle


def run_attack(server: ThreadedServer, fid: str, attack: Attack, trust: pb.TrustPolicy) -> None:
    data_dir = server.server.settings.data_dir
    fid = fid.replace("^", "pow")  # ids are [A-Za-z0-9._-]
    with ExitStack() as stack:
        client = Clients(stack, server.target)
        stack.enter_context(AdminClient(server.target)).create_federation(spec(fid, trust=trust))
        h1, h2, mallory = client(fid, "honest-1"), client(fid, "honest-2"), client(fid, "mallory")
        h1.join(rank=2, num_examples=10)
        h2.join(rank=4, num_examples=30)
        assert h1.push(adapter(2, 1), round=0, num_examples=10).uploads_in_round == 1
        if attack.tensors is None:
            error = refused(
                lambda: mallory.join(
                    rank=2, num_examples=attack.join_examples, lora_alpha=attack.join_alpha
                )
            )
        else:
            mallory.join(rank=2, num_examples=attack.join_examples, lora_alpha=attack.join_alpha)
            tensors = attack.tensors()
            error = refused(
                lambda: mallory.push(
                    tensors,
                    round=0,
                    num_examples=attack.push_examples,
                    lora_alpha=attack.push_alpha,
                )
            )
        check(error, attack.code, attack.reason, attack.field)
        # Nothing of it was counted, staged or kept.
        status = h1.status()
        assert (status.round, status.uploads) == (0, 1)
        assert status.joined_clients == (2 if attack.tensors is None else 3)
        assert staged(data_dir, fid) == ["honest-1.json", "honest-1.safetensors"]
        # The honest clients complete the round; the published state is finite.
        assert h2.push(adapter(4, 2), round=0, num_examples=30).uploads_in_round == 2
        assert h1.wait_for_round(0, timeout=30).round == 1
        manifest = store_of(data_dir, fid).read_manifest(1)
        assert sorted(u.client_id for u in manifest.uploads) == ["honest-1", "honest-2"]
        assert manifest.quarantined == ()
        pulled = h2.pull()
        assert pulled.round == 1 and finite(pulled)


@pytest.mark.parametrize("attack", POISON, ids=[a.name for a in POISON])
def test_poison_upload_is_refused_and_the_round_goes_on(
    open_server: ThreadedServer, attack: Attack
) -> None:
    run_attack(open_server, f"poison-{attack.name}", attack, POISON_TRUST)


def test_poison_then_crash_and_restart(tmp_path: Path) -> None:
    """Refused poison leaves nothing on disk that a restarted server would trip over."""
    data, fid = tmp_path / "data", "poison-restart"
    started: list[ServerProcess] = []
    try:
        first = start_server_process(data, tmp_path / "first.log")
        started.append(first)
        with ExitStack() as stack:
            client = Clients(stack, first.target)
            stack.enter_context(AdminClient(first.target)).create_federation(
                spec(fid, trust=POISON_TRUST)
            )
            h1, h2, mallory = client(fid, "h1"), client(fid, "h2"), client(fid, "mallory")
            h1.join(rank=2, num_examples=10)
            h2.join(rank=4, num_examples=30)
            mallory.join(rank=2, num_examples=10)
            overflow = POISON[0].tensors
            assert overflow is not None
            check(refused(lambda: mallory.push(overflow(), round=0, num_examples=10)), *BAD)
            h1.push(adapter(2, 1), round=0, num_examples=10)
            h2.push(adapter(4, 2), round=0, num_examples=30)
            assert h1.wait_for_round(0, timeout=30).round == 1
            kept = adapter(2, 3)
            assert h1.push(kept, round=1, num_examples=10).uploads_in_round == 1
            nan = poisoned(2, 4, "m0.lora_B.weight", (0, 0), math.nan)
            check(refused(lambda: mallory.push(nan, round=1, num_examples=10)), *BAD)
        first.kill()  # a crash: no graceful shutdown
        second = start_server_process(data, tmp_path / "second.log")
        started.append(second)
        with ExitStack() as stack:
            client = Clients(stack, second.target)
            h1, h2, mallory = client(fid, "h1"), client(fid, "h2"), client(fid, "mallory")
            for c, rank, n in ((h1, 2, 10), (h2, 4, 30), (mallory, 2, 10)):
                c.join(rank=rank, num_examples=n)  # identical re-joins: terms unchanged
            status = h1.status()
            assert (status.round, status.uploads) == (1, 1)
            norm = adapter(2, 5, gain=2.0)
            check(refused(lambda: mallory.push(norm, round=1, num_examples=10)), *BAD, "m0")
            assert h1.push(kept, round=1, num_examples=10).duplicate  # the ack survived
            assert h2.push(adapter(4, 6), round=1, num_examples=30).uploads_in_round == 2
            assert h1.wait_for_round(1, timeout=30).round == 2
            assert manifest_clients(data, fid, 2) == ["h1", "h2"]
            pulled = mallory.pull()
            assert pulled.round == 2 and finite(pulled)
        assert second.terminate() == 0
        for handle in started:  # no attack reached an internal error
            assert "Traceback" not in handle.log_text(), handle.log_text()[-3000:]
    finally:
        for handle in started:
            handle.stop()


# -- 2. identity ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    with threaded_server(tmp_path_factory.mktemp("auth"), admin_token=ADMIN_TOKEN) as handle:
        yield handle


@dataclass
class World:
    """Two per-client-credential federations and one under open enrolment, with clients."""

    target: str
    data_dir: Path
    admin: AdminClient
    creds: dict[str, str]  # "closed/alice", "closed/bob", "other/alice"
    secret: str  # the open federation's shared secret
    alice: RafloraClient  # joined "closed" with her credential, rank 2
    open_alice: RafloraClient  # claimed "alice" in "open" with the secret (TOFU), rank 2
    mallory: RafloraClient  # holds the same secret, joined "open" as "mallory", rank 4


@pytest.fixture(scope="module")
def world(auth_server: ThreadedServer) -> Iterator[World]:
    target = auth_server.target
    with ExitStack() as stack:
        admin = stack.enter_context(AdminClient(target, admin_token=ADMIN_TOKEN))
        admin.create_federation(spec("closed"))
        admin.create_federation(spec("other"))
        secret = admin.create_federation(spec("open"), open_enrolment=True).enrolment_secret
        creds = {
            f"{fid}/{cid}": admin.issue_client_credential(fid, cid)
            for fid, cid in (("closed", "alice"), ("closed", "bob"), ("other", "alice"))
        }
        client = Clients(stack, target)
        alice = client("closed", "alice", creds["closed/alice"])
        alice.join(rank=2, num_examples=10)
        open_alice = client("open", "alice", secret)
        open_alice.join(rank=2, num_examples=10)
        assert (open_alice.client_credential or "").startswith("rfc1.")  # TOFU: her own now
        mallory = client("open", "mallory", secret)
        mallory.join(rank=4, num_examples=10)
        yield World(
            target,
            auth_server.server.settings.data_dir,
            admin,
            creds,
            secret,
            alice,
            open_alice,
            mallory,
        )


def forged_credential(fid: str, cid: str) -> str:
    body = base64.urlsafe_b64encode(json.dumps({"f": fid, "c": cid}).encode()).rstrip(b"=")
    return f"rfc1.{body.decode()}.{'A' * 43}"


def edited_token(token: str, cid: str) -> str:
    """The token with its payload rewritten to name ``cid``, its MAC kept."""
    prefix, payload, mac = token.split(".")
    raw = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    raw["c"] = cid
    body = base64.urlsafe_b64encode(json.dumps(raw, separators=(",", ":")).encode())
    return f"{prefix}.{body.rstrip(b'=').decode()}.{mac}"


ENROLMENT_REJECTED = (C.UNAUTHENTICATED, R.ENROLMENT_REJECTED)

# (row, the credential presented, the client id claimed, code, reason)
CLOSED_JOINS: list[tuple[str, Callable[[World], str | None], str, grpc.StatusCode, str]] = [
    (
        "alice-credential-as-bob",
        lambda w: w.creds["closed/alice"],
        "bob",
        C.PERMISSION_DENIED,
        R.WRONG_CLIENT,
    ),
    (
        "bob-credential-tail-forged",
        lambda w: w.creds["closed/bob"][:-4] + "AAAA",
        "bob",
        *ENROLMENT_REJECTED,
    ),
    (
        "credential-forged-from-scratch",
        lambda w: forged_credential("closed", "bob"),
        "bob",
        *ENROLMENT_REJECTED,
    ),
    ("other-federation-credential", lambda w: w.creds["other/alice"], "alice", *ENROLMENT_REJECTED),
    ("client-token-as-credential", lambda w: w.alice.token, "alice", *ENROLMENT_REJECTED),
    ("open-federation-secret", lambda w: w.secret, "carol", *ENROLMENT_REJECTED),
    ("admin-token", lambda w: ADMIN_TOKEN, "carol", *ENROLMENT_REJECTED),
    ("no-credential", lambda w: None, "bob", C.UNAUTHENTICATED, R.CREDENTIAL_MISSING),
]


@pytest.mark.parametrize(
    ("credential", "claimed", "code", "reason"),
    [row[1:] for row in CLOSED_JOINS],
    ids=[row[0] for row in CLOSED_JOINS],
)
def test_per_client_credentials_enrol_only_their_client(
    world: World,
    credential: Callable[[World], str | None],
    claimed: str,
    code: grpc.StatusCode,
    reason: str,
) -> None:
    before = world.admin.get_federation("closed").status
    with RafloraClient(
        world.target, "closed", claimed, enrolment_secret=credential(world), retry=NO_RETRY
    ) as intruder:
        check(refused(lambda: intruder.join(rank=2, num_examples=10)), code, reason)
        assert intruder.token is None
    status = world.admin.get_federation("closed").status
    assert (status.joined_clients, status.uploads) == (before.joined_clients, 0)
    if claimed != "alice":
        assert not (world.data_dir / "federations/closed/clients" / f"{claimed}.json").exists()
    pulled = world.alice.pull()
    assert (pulled.rank, pulled.round) == (2, 0) and finite(pulled)


def _raw_push_as_alice(w: World, token: str | None) -> None:
    payload = save(adapter(2, 31))
    with grpc.insecure_channel(w.target) as channel:
        stub_of(channel).Push(
            iter(push_requests("open", "alice", payload, rank=2)),
            metadata=bearer(token),
            timeout=10,
        )


def _raw_pull_as_alice(w: World, token: str | None) -> None:
    with grpc.insecure_channel(w.target) as channel:
        request = pb.PullRequest(federation_id="open", client_id="alice")
        list(stub_of(channel).Pull(request, metadata=bearer(token), timeout=10))


def _raw_watch(w: World, fid: str, token: str | None) -> None:
    with grpc.insecure_channel(w.target) as channel:
        request = pb.WatchRoundsRequest(federation_id=fid)
        next(stub_of(channel).WatchRounds(request, metadata=bearer(token), timeout=10))


def _join_open(w: World, cid: str, credential: str | None, rank: int) -> None:
    with RafloraClient(
        w.target, "open", cid, enrolment_secret=credential, retry=NO_RETRY
    ) as intruder:
        intruder.join(rank=rank, num_examples=10)


# Mallory holds the open federation's shared secret, her own credential and her own token.
SQUATS: list[tuple[str, Callable[[World], object], grpc.StatusCode, str]] = [
    (
        "secret-joins-as-alice",
        lambda w: _join_open(w, "alice", w.secret, 2),
        C.PERMISSION_DENIED,
        R.CLIENT_ID_TAKEN,
    ),
    (
        "secret-rejoins-alice-at-rank-8",
        lambda w: _join_open(w, "alice", w.secret, 8),
        C.PERMISSION_DENIED,
        R.CLIENT_ID_TAKEN,
    ),
    (
        "own-credential-joins-as-alice",
        lambda w: _join_open(w, "alice", w.mallory.client_credential, 2),
        C.PERMISSION_DENIED,
        R.WRONG_CLIENT,
    ),
    (
        "own-token-pushes-as-alice",
        lambda w: _raw_push_as_alice(w, w.mallory.token),
        C.PERMISSION_DENIED,
        R.WRONG_CLIENT,
    ),
    (
        "own-token-pulls-as-alice",
        lambda w: _raw_pull_as_alice(w, w.mallory.token),
        C.PERMISSION_DENIED,
        R.WRONG_CLIENT,
    ),
    (
        "token-edited-to-alice-pushes",
        lambda w: _raw_push_as_alice(w, edited_token(w.mallory.token or "", "alice")),
        C.UNAUTHENTICATED,
        R.TOKEN_INVALID,
    ),
    (
        "token-edited-to-alice-pulls",
        lambda w: _raw_pull_as_alice(w, edited_token(w.mallory.token or "", "alice")),
        C.UNAUTHENTICATED,
        R.TOKEN_INVALID,
    ),
    (
        "own-token-watches-another-federation",
        lambda w: _raw_watch(w, "closed", w.mallory.token),
        C.PERMISSION_DENIED,
        R.WRONG_FEDERATION,
    ),
]


@pytest.mark.parametrize(
    ("attack", "code", "reason"), [row[1:] for row in SQUATS], ids=[row[0] for row in SQUATS]
)
def test_open_enrolment_squatter_cannot_act_as_the_first_owner(
    world: World, attack: Callable[[World], object], code: grpc.StatusCode, reason: str
) -> None:
    before = world.admin.get_federation("open").status
    check(refused(lambda: attack(world)), code, reason)
    status = world.admin.get_federation("open").status
    assert (status.joined_clients, status.uploads) == (before.joined_clients, before.uploads)
    record = json.loads((world.data_dir / "federations/open/clients/alice.json").read_text())
    assert record["rank"] == 2  # alice's terms are hers
    pulled = world.open_alice.pull()
    assert (pulled.rank, pulled.round) == (2, 0) and finite(pulled)


def test_concurrent_first_joins_claim_an_id_once(world: World) -> None:
    """Two holders of the secret race to claim one fresh id: one wins, one is refused."""
    outcomes: list[RafloraError | str] = []
    barrier = threading.Barrier(2)

    def claim(rank: int) -> None:
        with RafloraClient(
            world.target, "open", "carol", enrolment_secret=world.secret, retry=NO_RETRY
        ) as c:
            barrier.wait(5)
            try:
                c.join(rank=rank, num_examples=10)
                outcomes.append(c.client_credential or "")
            except RafloraError as exc:
                outcomes.append(exc)

    threads = [threading.Thread(target=claim, args=(r,)) for r in (2, 8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    won = [o for o in outcomes if isinstance(o, str)]
    lost = [o for o in outcomes if isinstance(o, RafloraError)]
    assert len(won) == 1 and won[0].startswith("rfc1."), outcomes
    assert len(lost) == 1
    check(lost[0], C.PERMISSION_DENIED, R.CLIENT_ID_TAKEN)
    status = world.admin.get_federation("open").status
    assert status.joined_clients == 3 and status.uploads == 0
    # The owner and the squatter both still finish a round of their own.
    assert world.open_alice.push(adapter(2, 41), round=0, num_examples=10).uploads_in_round == 1
    assert world.mallory.push(adapter(4, 42), round=0, num_examples=10).uploads_in_round == 2
    assert world.open_alice.wait_for_round(0, timeout=30).round == 1
    assert manifest_clients(world.data_dir, "open", 1) == ["alice", "mallory"]


def test_rotating_the_secret_locks_out_its_holders_not_the_owners(
    auth_server: ThreadedServer,
) -> None:
    """The shared secret leaked: rotating it revokes every token and stops the old secret
    from enrolling new ids, while the clients it enrolled keep their own credentials."""
    target, data_dir = auth_server.target, auth_server.server.settings.data_dir
    with ExitStack() as stack:
        admin = stack.enter_context(AdminClient(target, admin_token=ADMIN_TOKEN))
        leaked = admin.create_federation(spec("rotate"), open_enrolment=True).enrolment_secret
        client = Clients(stack, target)
        alice, bob = client("rotate", "alice", leaked), client("rotate", "bob", leaked)
        alice.join(rank=2, num_examples=10)
        bob.join(rank=4, num_examples=10)
        old_token = alice.token
        admin.rotate_enrolment_secret("rotate")
        with grpc.insecure_channel(target) as channel:
            request = pb.PullRequest(federation_id="rotate", client_id="alice")
            error = refused(
                lambda: list(stub_of(channel).Pull(request, metadata=bearer(old_token), timeout=10))
            )
        check(error, C.UNAUTHENTICATED, R.TOKEN_REVOKED)
        squatter = client("rotate", "dave", leaked)
        check(refused(lambda: squatter.join(rank=2, num_examples=10)), *ENROLMENT_REJECTED)
        assert admin.get_federation("rotate").status.joined_clients == 2
        # The owners re-join by themselves (the SDK answers TOKEN_REVOKED with their credential).
        assert alice.pull().round == 0
        assert alice.token != old_token
        assert alice.push(adapter(2, 1), round=0, num_examples=10).uploads_in_round == 1
        assert bob.push(adapter(4, 2), round=0, num_examples=10).uploads_in_round == 2
        assert alice.wait_for_round(0, timeout=30).round == 1
        assert manifest_clients(data_dir, "rotate", 1) == ["alice", "bob"]


def test_reissued_credential_revokes_the_old_tokens(auth_server: ThreadedServer) -> None:
    target, data_dir = auth_server.target, auth_server.server.settings.data_dir
    with ExitStack() as stack:
        admin = stack.enter_context(AdminClient(target, admin_token=ADMIN_TOKEN))
        admin.create_federation(spec("reissue"))
        old = admin.issue_client_credential("reissue", "alice")
        bob_cred = admin.issue_client_credential("reissue", "bob")
        client = Clients(stack, target)
        alice = client("reissue", "alice", old)
        alice.join(rank=2, num_examples=10)
        old_token = alice.token
        new = admin.issue_client_credential("reissue", "alice")  # e.g. the old one leaked
        with grpc.insecure_channel(target) as channel:
            stub = stub_of(channel)
            request = pb.PullRequest(federation_id="reissue", client_id="alice")
            error = refused(
                lambda: list(stub.Pull(request, metadata=bearer(old_token), timeout=10))
            )
            check(error, C.UNAUTHENTICATED, R.TOKEN_REVOKED)
            payload = save(adapter(2, 51))
            error = refused(
                lambda: stub.Push(
                    iter(push_requests("reissue", "alice", payload, rank=2)),
                    metadata=bearer(old_token),
                    timeout=10,
                )
            )
            check(error, C.UNAUTHENTICATED, R.TOKEN_REVOKED)
        thief = client("reissue", "alice", old)
        check(refused(lambda: thief.join(rank=2, num_examples=10)), *ENROLMENT_REJECTED)
        assert admin.get_federation("reissue").status.uploads == 0
        fresh = client("reissue", "alice", new)
        fresh.join(rank=2, num_examples=10)
        assert fresh.push(adapter(2, 51), round=0, num_examples=10).uploads_in_round == 1
        bob = client("reissue", "bob", bob_cred)
        bob.join(rank=4, num_examples=10)
        assert bob.push(adapter(4, 52), round=0, num_examples=10).uploads_in_round == 2
        assert fresh.wait_for_round(0, timeout=30).round == 1
        assert manifest_clients(data_dir, "reissue", 1) == ["alice", "bob"]
        assert finite(fresh.pull())


def test_credential_issued_after_auth_was_turned_on_joins(tmp_path: Path) -> None:
    with threaded_server(tmp_path, metrics_port=-1) as server:  # authentication off
        AdminClient(server.target).create_federation(spec("legacy", clients=1))
    with (
        threaded_server(tmp_path, admin_token=ADMIN_TOKEN, metrics_port=-1) as server,
        ExitStack() as stack,
    ):
        admin = stack.enter_context(AdminClient(server.target, admin_token=ADMIN_TOKEN))
        credential = admin.issue_client_credential("legacy", "alice")
        alice = Clients(stack, server.target)("legacy", "alice", credential)
        alice.join(rank=2, num_examples=10)  # INTERNAL today
        assert alice.push(adapter(2, 1), round=0, num_examples=10).uploads_in_round == 1
        assert alice.wait_for_round(0, timeout=30).round == 1


# -- 3. weight --------------------------------------------------------------------------------


@pytest.mark.parametrize("attack", WEIGHT, ids=[a.name for a in WEIGHT])
def test_declared_examples_are_bounded(open_server: ThreadedServer, attack: Attack) -> None:
    run_attack(open_server, f"weight-{attack.name}", attack, WEIGHT_TRUST)


def test_a_whale_is_capped_at_max_weight_share(open_server: ThreadedServer) -> None:
    """One client declaring 1e6 examples against 10 and 30 gets exactly the 0.5 cap, in the
    manifest, in the metric and in the aggregated state itself."""
    fid, data_dir = "whale", open_server.server.settings.data_dir
    declared = {"whale": 10**6, "c10": 10, "c30": 30}
    uploads = {cid: adapter(2, 60 + i) for i, cid in enumerate(declared)}
    with ExitStack() as stack:
        stack.enter_context(AdminClient(open_server.target)).create_federation(
            spec(fid, clients=3, strategy="flexlora", trust=pb.TrustPolicy(max_weight_share=0.5))
        )
        clients = {cid: Clients(stack, open_server.target)(fid, cid) for cid in declared}
        for cid, n in declared.items():
            clients[cid].join(rank=2, num_examples=n)
        for cid, n in declared.items():
            clients[cid].push(uploads[cid], round=0, num_examples=n)
        assert clients["c10"].wait_for_round(0, timeout=30).round == 1
    manifest = store_of(data_dir, fid).read_manifest(1)
    shares = {u.client_id: u.weight_share for u in manifest.uploads}
    expected = {"whale": 0.5, "c10": 0.125, "c30": 0.375}  # the excess spread 1:3
    assert shares == pytest.approx(expected, abs=1e-9)
    assert metric(
        open_server.metrics_url, "raflora_round_max_weight_share", federation=fid
    ) == pytest.approx(0.5)
    # The cap reached the engine: flexlora's state is Σ p_i s_i B_i A_i with the capped p (the
    # ranks sum to 6 <= max_rank 8, so the SVD is exact).
    state, _ = store_of(data_dir, fid).load_published(1, AdapterSchema.from_shapes(MODULES))
    for m in MODULES:
        want = sum(
            expected[cid] * 8.0 * (t[f"{m}.lora_B.weight"] @ t[f"{m}.lora_A.weight"])
            for cid, t in uploads.items()
        )
        assert isinstance(want, torch.Tensor)
        err = float((state.dense(m).double() - want.double()).norm() / want.double().norm())
        assert err < 1e-4, (m, err)


# -- 4. resource starvation -------------------------------------------------------------------


class Held:
    """Push streams that open (their metadata reaches the server) and never send a header."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.futures: list[Any] = []

    def _silence(self) -> Iterator[pb.PushRequest]:
        self.release.wait(15)
        yield from ()

    def open(self, stub: Any, n: int, metadata: Metadata | None) -> list[Any]:
        futures = [
            stub.Push.future(self._silence(), metadata=metadata, timeout=20) for _ in range(n)
        ]
        self.futures += futures
        return futures

    def close(self) -> None:
        self.release.set()
        for f in self.futures:
            f.cancel()


def refused_at_once(future: Any, within: float = 0.8) -> RafloraError | None:
    """The status of a call that must be refused on arrival; None if it was admitted."""
    try:
        future.result(timeout=within)
    except grpc.FutureTimeoutError:
        return None
    except grpc.RpcError as exc:
        return from_rpc_error(exc)
    pytest.fail("an over-the-limit push succeeded")


def saturate(
    stack: ExitStack, stub: Any, fill: list[tuple[int, Metadata | None]], probe: Metadata | None
) -> tuple[list[Any], RafloraError]:
    """Hold ``fill`` headerless pushes, then show one more from ``probe`` is refused at once.

    The held streams live push_header_timeout_seconds (1 s): when the machine is too slow to
    open them all within it, the probe is admitted; then try again (bounded).
    """
    for _ in range(3):
        held = Held()
        stack.callback(held.close)
        futures = [f for n, md in fill for f in held.open(stub, n, md)]
        time.sleep(0.25)  # the server admits them
        verdict = refused_at_once(held.open(stub, 1, probe)[0])
        if verdict is not None and not any(f.done() for f in futures):
            return futures, verdict
        held.close()
        wait_for("the held streams to end", _all_done(futures))
    pytest.fail("could not hold the streams within push_header_timeout_seconds")


def _result_of(future: Any) -> Callable[[], object]:
    return lambda: future.result(timeout=10)


def _all_done(futures: list[Any]) -> Callable[[], bool]:
    return lambda: all(f.done() for f in futures)


def ended_idle(futures: list[Any], started: float) -> None:
    """Every held stream is closed by the server with DEADLINE_EXCEEDED after ~1 s."""
    for future in futures:
        check(refused(_result_of(future)), C.DEADLINE_EXCEEDED, R.STREAM_IDLE)
    assert 0.9 < time.monotonic() - started < 8


STARVE_LIMITS: dict[str, Any] = {
    "max_rpcs_per_client": 8,
    "max_concurrent_rpcs": 32,
    "max_rpcs_per_host": 16,
    "max_watches_per_client": 2,
    "push_header_timeout_seconds": 1.0,
}


def test_one_token_cannot_starve_others(tmp_path: Path) -> None:
    with (
        threaded_server(
            tmp_path, admin_token=ADMIN_TOKEN, metrics_port=-1, **STARVE_LIMITS
        ) as server,
        ExitStack() as stack,
    ):
        admin = stack.enter_context(AdminClient(server.target, admin_token=ADMIN_TOKEN))
        secret = admin.create_federation(spec("starve", clients=1), open_enrolment=True)
        client = Clients(stack, server.target)
        mallory, honest = (
            client("starve", "mallory", secret.enrolment_secret),
            client("starve", "honest", secret.enrolment_secret),
        )
        mallory.join(rank=2, num_examples=10)
        honest.join(rank=2, num_examples=10)
        md = bearer(mallory.token)
        stub = stub_of(stack.enter_context(grpc.insecure_channel(server.target)))
        watch_request = pb.WatchRoundsRequest(federation_id="starve")
        watches = [stub.WatchRounds(watch_request, metadata=md, timeout=30) for _ in range(2)]
        for w in watches:
            stack.callback(w.cancel)
            assert next(w).type == pb.ROUND_EVENT_TYPE_STATUS
        third = stub.WatchRounds(watch_request, metadata=md, timeout=5)
        check(refused(lambda: next(third)), C.RESOURCE_EXHAUSTED, R.TOO_MANY_STREAMS)
        # 2 watches + 6 silent pushes fill mallory's 8 slots: the 9th call is refused.
        started = time.monotonic()
        held, verdict = saturate(stack, stub, [(6, md)], md)
        check(verdict, C.RESOURCE_EXHAUSTED, R.TOO_MANY_STREAMS)
        check(refused(lambda: mallory.status()), C.RESOURCE_EXHAUSTED, R.TOO_MANY_STREAMS)
        assert health(server.target) == SERVING
        assert honest.pull().round == 0  # another client's calls are its own
        assert honest.push(adapter(2, 1), round=0, num_examples=10).uploads_in_round == 1
        ended_idle(held, started)
        assert honest.wait_for_round(0, timeout=30).round == 1
        assert mallory.status().round == 1  # her slots came back
        assert mallory.status().uploads == 0

        # Server-wide: sybils fill the 32 slots (mallory's 2 watches included); the health
        # check still answers, and every raflora call waits its turn.
        sybils = [client("starve", f"sybil-{i}", secret.enrolment_secret) for i in range(4)]
        for s in sybils:
            s.join(rank=2, num_examples=10)
        fill = [(8, bearer(s.token)) for s in sybils[:3]] + [(6, bearer(sybils[3].token))]
        started = time.monotonic()
        held, verdict = saturate(stack, stub, fill, bearer(honest.token))
        check(verdict, C.RESOURCE_EXHAUSTED, R.TOO_MANY_STREAMS)
        assert "the server" in verdict.details
        assert health(server.target) == SERVING
        ended_idle(held, started)
        assert honest.push(adapter(2, 2), round=1, num_examples=10).uploads_in_round == 1
        assert honest.wait_for_round(1, timeout=30).round == 2
        assert manifest_clients(server.server.settings.data_dir, "starve", 2) == ["honest"]

        # Hung-up streams give their slots back: 10 watches opened and cancelled, then the cap
        # of 2 is whole again.
        for w in watches:
            w.cancel()
        for _ in range(10):
            w = stub.WatchRounds(watch_request, metadata=md, timeout=30)
            with contextlib.suppress(grpc.RpcError):  # an earlier cancel not yet released
                next(w)
            w.cancel()

        def two_watches() -> bool:
            opened = [stub.WatchRounds(watch_request, metadata=md, timeout=30) for _ in range(2)]
            try:
                return all(next(w).type == pb.ROUND_EVENT_TYPE_STATUS for w in opened)
            except grpc.RpcError:
                return False
            finally:
                for w in opened:
                    w.cancel()

        wait_for("mallory's watch slots to come back", two_watches, timeout=10)


def test_per_host_cap_protects_health_with_auth_off(tmp_path: Path) -> None:
    with (
        threaded_server(tmp_path, metrics_port=-1, **STARVE_LIMITS) as server,
        ExitStack() as stack,
    ):
        stack.enter_context(AdminClient(server.target)).create_federation(spec("host", clients=1))
        honest = Clients(stack, server.target)("host", "honest")
        honest.join(rank=2, num_examples=10)
        stub = stub_of(stack.enter_context(grpc.insecure_channel(server.target)))
        started = time.monotonic()
        held, verdict = saturate(stack, stub, [(16, None)], None)
        check(verdict, C.RESOURCE_EXHAUSTED, R.TOO_MANY_STREAMS)
        assert health(server.target) == SERVING
        ended_idle(held, started)
        assert honest.pull().round == 0
        assert honest.push(adapter(2, 1), round=0, num_examples=10).uploads_in_round == 1
        assert honest.wait_for_round(0, timeout=30).round == 1


def test_header_timeout_refusal_names_the_header_timeout(tmp_path: Path) -> None:
    with (
        threaded_server(tmp_path, push_header_timeout_seconds=1.0, metrics_port=-1) as server,
        ExitStack() as stack,
    ):
        stub = stub_of(stack.enter_context(grpc.insecure_channel(server.target)))
        held = Held()
        stack.callback(held.close)
        (future,) = held.open(stub, 1, None)
        error = refused(lambda: future.result(timeout=10))
        check(error, C.DEADLINE_EXCEEDED, R.STREAM_IDLE)
        assert "1s" in error.details, error.details


# -- 5. stored bytes --------------------------------------------------------------------------


def test_stored_bytes_damage_is_contained(tmp_path: Path) -> None:
    """Bit flips, a garbage record and a lost manifest, found by a real server process."""
    data = tmp_path / "data"
    feds = data / "federations"
    started: list[ServerProcess] = []
    try:
        # Folding and read-backs off: the close must read the flipped upload back (with either,
        # the bytes checked when they were read back are the round's, and a flip after that
        # never reaches it; tests/test_runtime.py covers each).
        first = start_server_process(
            data,
            tmp_path / "first.log",
            env={"RAFLORA_FOLD_MEMORY_MIB": "0", "RAFLORA_PRELOAD_MEMORY_MIB": "0"},
        )
        started.append(first)
        with ExitStack() as stack:
            admin = stack.enter_context(AdminClient(first.target))
            client = Clients(stack, first.target)
            for fid, n in (
                ("flip-upload", 3),
                ("flip-state", 1),
                ("flip-old-state", 1),
                ("garbage-record", 2),
                ("lost-manifest", 1),
                ("healthy", 1),
            ):
                admin.create_federation(spec(fid, clients=n))
            # An acknowledged upload is flipped on disk before its round closes.
            a, b, c = (client("flip-upload", cid) for cid in "abc")
            for x in (a, b, c):
                x.join(rank=2, num_examples=10)
            a.push(adapter(2, 1), round=0, num_examples=10)
            b.push(adapter(2, 2), round=0, num_examples=10)
            flip_bit(feds / "flip-upload/uploads/00000000/a.safetensors")
            stub = stub_of(stack.enter_context(grpc.insecure_channel(first.target)))
            watch = stub.WatchRounds(pb.WatchRoundsRequest(federation_id="flip-upload"), timeout=30)
            stack.callback(watch.cancel)
            assert next(watch).type == pb.ROUND_EVENT_TYPE_STATUS
            c.push(adapter(2, 3), round=0, num_examples=10)
            events = []
            for event in watch:
                events.append((event.type, event.message))
                if event.type == pb.ROUND_EVENT_TYPE_PUBLISHED:
                    break
            quarantined = [m for t, m in events if t == pb.ROUND_EVENT_TYPE_QUARANTINED]
            assert len(quarantined) == 1 and "upload of a " in quarantined[0], events
            manifest = store_of(data, "flip-upload").read_manifest(1)
            assert sorted(u.client_id for u in manifest.uploads) == ["b", "c"]
            assert manifest.quarantined == ("a",)
            assert metric(
                first.metrics_url, "raflora_uploads_quarantined_total", federation="flip-upload"
            ) == pytest.approx(1.0)
            kept = sorted(p.name for p in (feds / "flip-upload/quarantine/00000000").iterdir())
            assert [k.split(".", 2)[2] for k in kept] == ["json", "reason.txt", "safetensors"]
            assert a.push(adapter(2, 4), round=1, num_examples=10).uploads_in_round == 1
            assert finite(c.pull())
            # Rounds to damage after a clean stop.
            state = client("flip-state", "s")
            state.join(rank=2, num_examples=10)
            state.push(adapter(2, 5), round=0, num_examples=10)
            old = client("flip-old-state", "o")
            old.join(rank=2, num_examples=10)
            lost = client("lost-manifest", "l")
            lost.join(rank=2, num_examples=10)
            for r in range(2):
                old.push(adapter(2, 10 + r), round=r, num_examples=10)
                assert old.wait_for_round(r, timeout=30).round == r + 1
                lost.push(adapter(2, 20 + r), round=r, num_examples=10)
                assert lost.wait_for_round(r, timeout=30).round == r + 1
            garbage = client("garbage-record", "x")
            garbage.join(rank=2, num_examples=10)
            assert garbage.push(adapter(2, 6), round=0, num_examples=10).uploads_in_round == 1
            assert state.wait_for_round(0, timeout=30).round == 1
        assert first.terminate() == 0
        flip_bit(feds / "flip-state/rounds/00000001/state.safetensors")
        flip_bit(feds / "flip-old-state/rounds/00000001/state.safetensors")
        (feds / "garbage-record/uploads/00000000/x.json").write_bytes(b"\x00\xffnot json{")
        (feds / "lost-manifest/rounds/00000002/manifest.json").unlink()

        second = start_server_process(data, tmp_path / "second.log")
        started.append(second)
        url = second.metrics_url
        with ExitStack() as stack:
            client = Clients(stack, second.target)
            # A corrupt newest state: that federation alone refuses, UNAVAILABLE.
            s = client("flip-state", "s")
            check(
                refused(lambda: s.join(rank=2, num_examples=10)),
                C.UNAVAILABLE,
                R.FEDERATION_DEGRADED,
            )
            check(refused(lambda: s.pull()), C.UNAVAILABLE, R.FEDERATION_DEGRADED)
            with grpc.insecure_channel(second.target) as channel:
                payload = save(adapter(2, 7))
                error = refused(
                    lambda: stub_of(channel).Push(
                        iter(push_requests("flip-state", "s", payload, rank=2, round_=1)),
                        timeout=10,
                    )
                )
            check(error, C.UNAVAILABLE, R.FEDERATION_DEGRADED)
            assert s.status().degraded  # GetRound says why (operators read it)
            assert metric(url, "raflora_federation_degraded", federation="flip-state") == 1.0
            assert metric(url, "raflora_federation_degraded", federation="healthy") == 0.0
            # The other federations of the server keep serving.
            h = client("healthy", "h")
            h.join(rank=2, num_examples=10)
            assert h.push(adapter(2, 8), round=0, num_examples=10).uploads_in_round == 1
            assert h.wait_for_round(0, timeout=30).round == 1
            assert finite(h.pull())
            # A corrupt older state fails only the pull that asks for it.
            o = client("flip-old-state", "o")
            o.join(rank=2, num_examples=10)
            check(refused(lambda: o.pull(round=1)), C.UNAVAILABLE, R.FEDERATION_DEGRADED)
            assert o.pull().round == 2
            assert o.pull(round=0).round == 0
            o.push(adapter(2, 12), round=2, num_examples=10)
            assert o.wait_for_round(2, timeout=30).round == 3
            # A garbage upload record: set aside, counted, and its client uploads again.
            x = client("garbage-record", "x")
            x.join(rank=2, num_examples=10)
            assert x.status().uploads == 0
            assert metric(url, "raflora_storage_problems_total", federation="garbage-record") >= 1
            assert list((feds / "garbage-record/quarantine/00000000").glob("x.*.json"))
            assert x.push(adapter(2, 6), round=0, num_examples=10).uploads_in_round == 1
            # A lost newest manifest: resume at round 1, say so, and publish round 2 again.
            lm = client("lost-manifest", "l")
            lm.join(rank=2, num_examples=10)
            assert lm.status().round == 1
            assert metric(url, "raflora_storage_problems_total", federation="lost-manifest") > 0
            assert "federation lost-manifest: storage: round 2 is incomplete" in second.log_text()
            lm.push(adapter(2, 21), round=1, num_examples=10)
            assert lm.wait_for_round(1, timeout=30).round == 2
            assert manifest_clients(data, "lost-manifest", 2) == ["l"]
        assert second.terminate() == 0
        for handle in started:  # damage is contained: no internal error anywhere
            assert "Traceback" not in handle.log_text(), handle.log_text()[-3000:]
    finally:
        for handle in started:
            handle.stop()


_RECORD_GARBAGE = [
    pytest.param("upload", b"\x00\xff\xfe binary", id="upload-record-binary"),
    pytest.param("upload", b'{"client_id": "x", "round": 0', id="upload-record-truncated"),
    pytest.param("upload", b"[1, 2, 3]", id="upload-record-a-list"),
    pytest.param("upload", b"1e999", id="upload-record-a-number"),
    pytest.param(
        "upload",
        b'{"client_id": "y", "round": 0, "rank": 2}',
        id="upload-record-incomplete",
    ),
    pytest.param(
        "upload",
        b"[" * 100_000,
        id="upload-record-deeply-nested",
    ),
    pytest.param("client", b"\x00\xff not json", id="client-record-binary"),
    pytest.param(
        "client",
        b"[" * 100_000,
        id="client-record-deeply-nested",
    ),
]


@pytest.mark.parametrize(("record", "garbage"), _RECORD_GARBAGE)
def test_a_garbage_record_does_not_take_the_federation_down(
    tmp_path: Path, record: str, garbage: bytes
) -> None:
    fed = tmp_path / "federations" / "g"
    with threaded_server(tmp_path, metrics_port=-1) as server, ExitStack() as stack:
        stack.enter_context(AdminClient(server.target)).create_federation(spec("g"))
        client = Clients(stack, server.target)
        x, y = client("g", "x"), client("g", "y")
        x.join(rank=2, num_examples=10)
        y.join(rank=4, num_examples=10)
        assert x.push(adapter(2, 1), round=0, num_examples=10).uploads_in_round == 1
    target = fed / ("uploads/00000000/x.json" if record == "upload" else "clients/x.json")
    target.write_bytes(garbage)
    with threaded_server(tmp_path) as server, ExitStack() as stack:
        client = Clients(stack, server.target)
        x, y = client("g", "x"), client("g", "y")
        status = y.status()  # the federation is served
        assert status.round == 0 and not status.degraded
        assert status.uploads == (0 if record == "upload" else 1)
        assert metric(server.metrics_url, "raflora_storage_problems_total", federation="g") >= (
            1 if record == "upload" else 0
        )
        x.join(rank=2, num_examples=10)  # a lost client record: it joins again
        y.join(rank=4, num_examples=10)
        if record == "upload":
            assert x.push(adapter(2, 1), round=0, num_examples=10).uploads_in_round == 1
        assert y.push(adapter(4, 2), round=0, num_examples=10).uploads_in_round == 2
        assert y.wait_for_round(0, timeout=30).round == 1
        assert manifest_clients(tmp_path, "g", 1) == ["x", "y"]


def test_a_corrupt_cached_view_is_never_served_as_valid(tmp_path: Path) -> None:
    """A flipped bit in a cached view read from storage: the SDK's digest check refuses it, and
    the server, which hashes what it sends, drops the view so the next pull gets a rebuilt,
    valid one. (Hot views off: every pull reads the view file.)"""
    with threaded_server(tmp_path, hot_view_memory_mib=0) as server, ExitStack() as stack:
        stack.enter_context(AdminClient(server.target)).create_federation(spec("view"))
        client = Clients(stack, server.target)
        victim, other = client("view", "victim"), client("view", "other")
        victim.join(rank=2, num_examples=10)
        other.join(rank=4, num_examples=10)
        assert finite(victim.pull())
        (view,) = (tmp_path / "federations/view/views/00000000").glob("rank-2-*.safetensors")
        flip_bit(view)
        check(refused(victim.pull), C.DATA_LOSS, R.CHECKSUM_MISMATCH, "sha256")
        assert finite(victim.pull())  # rebuilt from the published state
        assert finite(other.pull())  # another rank's view is untouched
        victim.push(adapter(2, 1), round=0, num_examples=10)
        other.push(adapter(4, 2), round=0, num_examples=10)
        assert victim.wait_for_round(0, timeout=30).round == 1
        assert finite(victim.pull())  # the new round's view is fresh


def test_a_view_damaged_at_rest_never_enters_memory(tmp_path: Path) -> None:
    """Hot views on (the default): a view's bytes enter memory only after a whole stream of
    them matched the digest. A bit flipped on disk after that is never served; once the view
    leaves memory (evicted, here by hand) the damaged file is refused, kept out of memory, and
    rebuilt."""
    with threaded_server(tmp_path) as server, ExitStack() as stack:
        hot = server.server.hub.hot_views
        stack.enter_context(AdminClient(server.target)).create_federation(spec("hot"))
        victim = Clients(stack, server.target)("hot", "victim")
        victim.join(rank=2, num_examples=10)
        first = victim.pull()
        assert hot.entries() == 1
        (view,) = (tmp_path / "federations/hot/views/00000000").glob("rank-2-*.safetensors")
        flip_bit(view)
        again = victim.pull()  # from memory: the verified bytes, not the damaged file
        assert again.tensors.keys() == first.tensors.keys()
        assert all(torch.equal(again.tensors[k], first.tensors[k]) for k in first.tensors)
        hot.drop(lambda key: True)  # what an eviction does
        check(refused(victim.pull), C.DATA_LOSS, R.CHECKSUM_MISMATCH, "sha256")
        assert hot.entries() == 0 and hot.used == 0  # the damaged stream kept nothing
        rebuilt = victim.pull()
        assert all(torch.equal(rebuilt.tensors[k], first.tensors[k]) for k in first.tensors)
        assert hot.entries() == 1


# -- 6. races ---------------------------------------------------------------------------------


def test_push_streaming_across_the_close_and_duplicate_repush(open_server: ThreadedServer) -> None:
    fid, data_dir = "race-close", open_server.server.settings.data_dir
    with ExitStack() as stack:
        stack.enter_context(AdminClient(open_server.target)).create_federation(spec(fid))
        client = Clients(stack, open_server.target)
        slow, h1, h2 = client(fid, "slow"), client(fid, "h1"), client(fid, "h2")
        for c, rank in ((slow, 2), (h1, 2), (h2, 4)):
            c.join(rank=rank, num_examples=10)
        payload = save(adapter(2, 70))
        messages = push_requests(fid, "slow", payload, rank=2, chunk=256)
        go = threading.Event()
        stack.callback(go.set)

        def slowly() -> Iterator[pb.PushRequest]:
            yield from messages[:2]  # the header and the first chunk
            go.wait(20)
            for m in messages[2:]:
                time.sleep(0.001)
                yield m

        stub = stub_of(stack.enter_context(grpc.insecure_channel(open_server.target)))
        future = stub.Push.future(slowly(), timeout=40)
        wait_for(
            "the slow upload to start",
            lambda: any(".incoming-" in n for n in staged(data_dir, fid)),
        )
        h1_upload = adapter(2, 71)
        h1.push(h1_upload, round=0, num_examples=10)
        h2.push(adapter(4, 72), round=0, num_examples=10)
        assert h1.wait_for_round(0, timeout=30).round == 1
        go.set()
        error = refused(lambda: future.result(timeout=30))
        check(error, C.FAILED_PRECONDITION, R.ROUND_CLOSED, "round")
        assert str(data_dir) not in error.details and "/tmp" not in error.details
        assert manifest_clients(data_dir, fid, 1) == ["h1", "h2"]
        assert staged(data_dir, fid, 0) == []
        # A lost ack is harmless: the identical re-push of the upload that counted is a
        # duplicate even after the close; the late upload itself is still late.
        again = h1.push(h1_upload, round=0, num_examples=10)
        assert again.duplicate and again.uploads_in_round == 2
        late = adapter(2, 70)
        check(
            refused(lambda: slow.push(late, round=0, num_examples=10)),
            C.FAILED_PRECONDITION,
            R.ROUND_CLOSED,
        )
        assert slow.push(late, round=1, num_examples=10).uploads_in_round == 1
        assert h1.status().uploads == 1


def test_a_watcher_that_never_reads_is_cut_off(open_server: ThreadedServer) -> None:
    """A raw WatchRounds that is never read while more than the queue capacity (1024) of
    events pass. Producing 1024 real events would take ~340 rounds; the events are put on the
    federation's own bus instead (the server's real fan-out, stream and flow control)."""
    fid = "lagging"
    with ExitStack() as stack:
        stack.enter_context(AdminClient(open_server.target)).create_federation(spec(fid, clients=1))
        honest = Clients(stack, open_server.target)(fid, "honest")
        honest.join(rank=2, num_examples=10)
        runtime = open_server.server.hub.get(fid)
        channel = stack.enter_context(
            grpc.insecure_channel(
                open_server.target,
                options=[("grpc.http2.lookahead_bytes", 65536), ("grpc.http2.bdp_probe", 0)],
            )
        )
        watch = stub_of(channel).WatchRounds(pb.WatchRoundsRequest(federation_id=fid), timeout=60)
        stack.callback(watch.cancel)
        assert next(watch).type == pb.ROUND_EVENT_TYPE_STATUS
        wait_for("the watch to subscribe", lambda: runtime.events.watchers == 1)
        flood = 6000

        async def produce() -> None:
            for i in range(flood):
                runtime.events.emit(RoundEvent(EventType.FAILED, runtime.snapshot(), f"#{i}"))
                if i % 4 == 0:
                    await asyncio.sleep(0)

        open_server.run(produce())
        assert runtime.events.watchers == 0  # cut off: no queue grows without bound
        received = sum(1 for _ in watch)  # the stream ends cleanly once read
        assert 0 < received < flood
        assert honest.push(adapter(2, 1), round=0, num_examples=10).uploads_in_round == 1
        assert honest.wait_for_round(0, timeout=30).round == 1


def _race_pulls(
    server: ThreadedServer, fid: str, rounds_for: Callable[[int], int | None], rounds: int
) -> Counter[tuple[str, str | None]]:
    """Pullers in threads (a few hundred pulls at most) while a pusher publishes ``rounds``
    rounds; stops early at the first INTERNAL."""
    outcomes: Counter[tuple[str, str | None]] = Counter()
    stop = threading.Event()
    with ExitStack() as stack:
        stack.enter_context(AdminClient(server.target)).create_federation(spec(fid, clients=1))
        client = Clients(stack, server.target)
        pusher = client(fid, "pusher")
        pusher.join(rank=2, num_examples=10)
        pullers = [client(fid, f"puller-{i}") for i in range(4)]
        for i, p in enumerate(pullers):
            p.join(rank=(1, 2, 4, 8)[i], num_examples=10)
        lock = threading.Lock()

        def pull_loop(p: RafloraClient) -> None:
            for n in range(100):
                if stop.is_set():
                    return
                try:
                    p.pull(round=rounds_for(n))
                    key: tuple[str, str | None] = ("OK", None)
                except RafloraError as exc:
                    key = (exc.code.name, exc.reason)
                with lock:
                    outcomes[key] += 1
                if key[0] == "INTERNAL":
                    stop.set()

        threads = [threading.Thread(target=pull_loop, args=(p,)) for p in pullers]
        for t in threads:
            t.start()

        def pulled(at_least: int) -> Callable[[], bool]:
            return lambda: stop.is_set() or sum(outcomes.values()) >= at_least

        try:
            for r in range(rounds):
                # Pace the publications so that pulls overlap every one of them.
                wait_for("pulls between publications", pulled(12 * r), timeout=20)
                if stop.is_set():
                    break
                pusher.push(adapter(2, 80 + r), round=r, num_examples=10)
                pusher.wait_for_round(r, timeout=30)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
    return outcomes


def test_newest_round_pulls_racing_publication_never_fail(open_server: ThreadedServer) -> None:
    outcomes = _race_pulls(open_server, "race-newest", lambda n: None, rounds=6)
    assert set(outcomes) == {("OK", None)}, outcomes
    assert outcomes["OK", None] >= 12 * 5


def test_old_round_pulls_racing_publication_never_fail(open_server: ThreadedServer) -> None:
    outcomes = _race_pulls(open_server, "race-old", lambda n: 0 if n % 2 else None, rounds=12)
    assert ("INTERNAL", "INTERNAL") not in outcomes, outcomes


# -- 7. small ---------------------------------------------------------------------------------

HUGE = "x" * (17 << 10)


@dataclass
class Small:
    target: str
    admin: AdminClient
    stack: ExitStack

    def sdk(self, cid: str, fid: str = "small") -> RafloraClient:
        return Clients(self.stack, self.target)(fid, cid)

    def raw_push(self, cid: str) -> None:
        payload = save(adapter(2, 90))
        with grpc.insecure_channel(self.target) as channel:
            stub_of(channel).Push(iter(push_requests("small", cid, payload, rank=2)), timeout=10)


SMALL: list[tuple[str, Callable[[Small], object], grpc.StatusCode, str, str]] = [
    (
        "join-client-id-17KiB",
        lambda s: s.sdk(HUGE).join(rank=2, num_examples=1),
        *BAD_FIELD,
        "client_id",
    ),
    (
        "pull-client-id-17KiB",
        lambda s: s.sdk(HUGE).pull(),
        C.FAILED_PRECONDITION,
        R.NOT_JOINED,
        "client_id",
    ),
    (
        "push-client-id-17KiB",
        lambda s: s.raw_push(HUGE),
        C.FAILED_PRECONDITION,
        R.NOT_JOINED,
        "client_id",
    ),
    (
        "getround-federation-id-17KiB",
        lambda s: s.sdk("c", HUGE).status(),
        C.NOT_FOUND,
        R.FEDERATION_NOT_FOUND,
        "federation_id",
    ),
    (
        "join-federation-id-17KiB",
        lambda s: s.sdk("c", HUGE).join(rank=2, num_examples=1),
        C.NOT_FOUND,
        R.FEDERATION_NOT_FOUND,
        "federation_id",
    ),
    (
        "join-client-id-newline",
        lambda s: s.sdk("legit\n").join(rank=2, num_examples=1),
        *BAD_FIELD,
        "client_id",
    ),
    (
        "create-federation-id-newline",
        lambda s: s.admin.create_federation(spec("legit\n")),
        *BAD_FIELD,
        "federation_id",
    ),
    (
        "spec-d_out-2^31",
        lambda s: s.admin.create_federation(federation_spec("d-out", {"m": (2**31, 4)})),
        *BAD_FIELD,
        "modules.0.d_out",
    ),
    (
        "spec-d_in-2^32-1",
        lambda s: s.admin.create_federation(federation_spec("d-in", {"m": (4, 2**32 - 1)})),
        *BAD_FIELD,
        "modules.0.d_in",
    ),
    (
        "spec-max_rank-2^32-1",
        lambda s: s.admin.create_federation(spec("rank", max_rank=2**32 - 1)),
        *BAD_FIELD,
        "max_rank",
    ),
    (
        "spec-allowed_ranks-2^32-1",
        lambda s: s.admin.create_federation(spec("allowed", allowed_ranks=[2**32 - 1])),
        *BAD_FIELD,
        "allowed_ranks",
    ),
    (
        "spec-adapter-too-large",
        lambda s: s.admin.create_federation(
            federation_spec("huge", {f"m{i}": (1 << 20, 1 << 20) for i in range(9)}, max_rank=4096)
        ),
        *BAD_FIELD,
        "modules",
    ),
    (
        "spec-lora_alpha-nan",
        lambda s: s.admin.create_federation(spec("alpha", lora_alpha=math.nan)),
        *BAD_FIELD,
        "lora_alpha",
    ),
]


@pytest.fixture(scope="module")
def small(open_server: ThreadedServer) -> Iterator[Small]:
    with ExitStack() as stack:
        admin = stack.enter_context(AdminClient(open_server.target))
        admin.create_federation(spec("small"))
        ctx = Small(open_server.target, admin, stack)
        ctx.sdk("honest").join(rank=2, num_examples=10)
        yield ctx


@pytest.mark.parametrize(
    ("attack", "code", "reason", "field"), [r[1:] for r in SMALL], ids=[r[0] for r in SMALL]
)
def test_small_attacks_get_small_bounded_refusals(
    small: Small,
    attack: Callable[[Small], object],
    code: grpc.StatusCode,
    reason: str,
    field: str,
) -> None:
    before = {f.spec.federation_id for f in small.admin.list_federations()}
    error = refused(lambda: attack(small))
    check(error, code, reason, field)
    assert len(error.details) < 3000
    assert {f.spec.federation_id for f in small.admin.list_federations()} == before
    honest = small.sdk("honest")
    honest.join(rank=2, num_examples=10)
    status = honest.status()
    assert (status.joined_clients, status.uploads) == (1, 0)
    assert finite(honest.pull())


def _view_files(data_dir: Path, fid: str) -> int:
    return len(list((data_dir / "federations" / fid / "views/00000000").glob("*.safetensors")))


def test_one_client_cycling_alphas_is_bounded(open_server: ThreadedServer) -> None:
    """60 re-joins with 60 alphas, each followed by a pull: the join limit (20 term changes a
    round) stops the scale churn, so the round's views stay far below max_views_per_round."""
    fid, data_dir = "alphas", open_server.server.settings.data_dir
    with ExitStack() as stack:
        stack.enter_context(AdminClient(open_server.target)).create_federation(spec(fid))
        client = Clients(stack, open_server.target)
        churner, honest = client(fid, "churner"), client(fid, "honest")
        honest.join(rank=2, num_examples=10)
        accepted, refusals = 0, []
        for i in range(60):
            try:
                churner.join(rank=2, num_examples=10, lora_alpha=1.0 + i)
            except RafloraError as exc:
                refusals.append(exc)
                continue
            accepted += 1
            assert finite(churner.pull())
        assert accepted == 20 and len(refusals) == 40
        for error in refusals:
            check(error, C.RESOURCE_EXHAUSTED, R.JOIN_LIMIT, "client_id")
        assert _view_files(data_dir, fid) <= 20 < 64
        assert honest.pull().round == 0
        honest.push(adapter(2, 1), round=0, num_examples=10)
        churner.push(adapter(2, 2), round=0, num_examples=10)  # at its last accepted terms
        assert honest.wait_for_round(0, timeout=30).round == 1


def test_many_clients_cycling_alphas_stay_within_max_views(open_server: ThreadedServer) -> None:
    fid, data_dir = "alphas-many", open_server.server.settings.data_dir
    with ExitStack() as stack:
        stack.enter_context(AdminClient(open_server.target)).create_federation(spec(fid))
        client = Clients(stack, open_server.target)
        churners = [client(fid, f"churner-{i}") for i in range(4)]
        for k, churner in enumerate(churners):
            for i in range(17):
                churner.join(rank=2, num_examples=10, lora_alpha=1.0 + i + k / 100)
                assert finite(churner.pull())
        assert _view_files(data_dir, fid) <= 64


def test_a_hostile_tensor_name_gets_a_readable_refusal(small: Small) -> None:
    emoji = small.sdk("emoji")
    emoji.join(rank=2, num_examples=10)
    name = "\U0001f600" * 400
    for _ in range(30):  # past the soft limit, gRPC rejects at random: try 30 times
        error = refused(lambda: emoji.push({name: torch.zeros(2, 12)}, round=0, num_examples=10))
        check(error, C.INVALID_ARGUMENT, R.INVALID_UPDATE)
    assert emoji.status().uploads == 0


# A member's own token, its enrolment credential, the open federation's secret, or nothing,
# against each admin RPC this release added; the code each must get.
ADMIN_RPCS: list[tuple[str, Callable[[Any], object]]] = [
    (
        "DeleteFederation",
        lambda s: s.DeleteFederation(
            pb.DeleteFederationRequest(federation_id="closed"), timeout=10, metadata=s.md
        ),
    ),
    (
        "ListClients",
        lambda s: s.ListClients(
            pb.ListClientsRequest(federation_id="closed"), timeout=10, metadata=s.md
        ),
    ),
    (
        "ExportAdapter",
        lambda s: list(
            s.ExportAdapter(
                pb.ExportAdapterRequest(federation_id="closed", rank=2), timeout=10, metadata=s.md
            )
        ),
    ),
]
PRESENTED: list[tuple[str, Callable[[World], str | None]]] = [
    ("client-token", lambda w: w.alice.token),
    ("client-credential", lambda w: w.creds["closed/alice"]),
    ("open-secret", lambda w: w.secret),
    ("nothing", lambda w: None),
]


class _AdminStub:
    def __init__(self, channel: grpc.Channel, md: Metadata | None) -> None:
        self._stub = pb_grpc.AdminServiceStub(channel)
        self.md = md

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stub, name)


@pytest.mark.parametrize("rpc", [r[1] for r in ADMIN_RPCS], ids=[r[0] for r in ADMIN_RPCS])
@pytest.mark.parametrize("presented", [p[1] for p in PRESENTED], ids=[p[0] for p in PRESENTED])
def test_a_member_cannot_delete_export_or_list_a_federation(
    world: World, rpc: Callable[[Any], object], presented: Callable[[World], str | None]
) -> None:
    with grpc.insecure_channel(world.target) as channel:
        error = refused(lambda: rpc(_AdminStub(channel, bearer(presented(world)))))
    assert error.code in (C.UNAUTHENTICATED, C.PERMISSION_DENIED), error
    # The federation is untouched and its members keep being served.
    assert world.admin.get_federation("closed").spec.federation_id == "closed"
    assert world.alice.status().round >= 0
    assert (world.data_dir / "federations" / "closed").is_dir()
