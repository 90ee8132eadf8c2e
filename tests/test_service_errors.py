"""Bad input gets the documented status, is never half-counted, and never stalls other clients.

Each case runs against a fresh federation on one real server (loopback gRPC, the real SDK; raw
stubs only where the SDK cannot produce the bad input). A good client has already uploaded when
the bad input arrives, so "nothing counted" is checked against a round that is genuinely in
progress. Every case then asserts:

* the exact status code the API documents (the typed SDK exception where the SDK is used),
* a message of the form ``<field>: <problem>`` naming the bad field or tensor,
* ``GetRound`` upload and joined-client counts unchanged, no ``.incoming-*`` file left behind,
* the ``raflora_rpcs_total`` counter for that method and code went up by one,
* and finally that the good clients still complete the round, whose published state equals
  the engine run directly on the good uploads only (and whose manifest lists only them).
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from safetensors.torch import save as save_safetensors
from torch import Tensor

from raflora.client_sdk import (
    AdminClient,
    AlreadyExistsError,
    DataLossError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    RafloraClient,
    RafloraError,
    RetryPolicy,
    pb,
)
from raflora.server.engine import (
    AdapterSchema,
    GlobalState,
    Strategy,
    StrategyConfig,
    lora_scaling,
    make_strategy,
)
from raflora.server.storage import FileFederationStore
from raflora.server.testing import ThreadedServer, threaded_server
from raflora.v1 import aggregation_pb2_grpc as pb_grpc
from raflora.v1.wire import LORA_A, LORA_B, iter_chunks, sha256_hex, tensor_name

from .conftest import rel_err
from .helpers.adapters import engine_update, factors, push_header
from .helpers.federations import every_client_spec, spec
from .helpers.metrics import metric_value
from .helpers.rpc import refusal
from .helpers.waiting import wait_until

MODULES = {"layers.0.q": (16, 12), "layers.0.v": (12, 20)}
MAX_RANK = 8
SEED = 3
CHUNK = 1024  # small, so that even these tiny uploads travel in several chunks
GOOD = {"good-a": (2, 30, 8.0), "good-b": (4, 12, 16.0)}  # client: rank, examples, lora alpha
BAD_RANK = 2
NO_RETRY = RetryPolicy(attempts=1)

SDK_ERRORS: dict[grpc.StatusCode, type[RafloraError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        FailedPreconditionError,
        AlreadyExistsError,
        DataLossError,
    )
}
_ids = itertools.count()


def payload(tensors: dict[str, Tensor]) -> bytes:
    data: bytes = save_safetensors(tensors)
    return data


def chunks(data: bytes, size: int = CHUNK) -> list[pb.PushRequest]:
    return [pb.PushRequest(data=c) for c in iter_chunks(data, size)]


def trailer(sha256: str) -> pb.PushRequest:
    return pb.PushRequest(trailer=pb.PushTrailer(sha256=sha256))


def rpc_count(url: str, method: str, code: grpc.StatusCode) -> float:
    return metric_value(url, "raflora_rpcs_total", method=method, code=code.name)


@dataclass
class Federation:
    """A fresh federation: two good clients, one joined ``bad`` client and a raw stub."""

    server: ThreadedServer
    data_dir: Path
    id: str
    good: dict[str, RafloraClient]
    bad: RafloraClient
    stub: Any  # pb_grpc.AggregationServiceStub (generated without annotations)
    strategy: Strategy
    state: GlobalState  # the engine's mirror of the newest published state
    stack: ExitStack  # closes every client and channel when the test ends
    pushed: dict[str, dict[str, Tensor]] = field(default_factory=dict)

    @property
    def round(self) -> int:
        return self.state.round

    def client(self, client_id: str, federation_id: str | None = None) -> RafloraClient:
        """A further SDK client (not joined), closed with the federation."""
        client = RafloraClient(
            self.server.target, federation_id or self.id, client_id, retry=NO_RETRY
        )
        return self.stack.enter_context(client)

    def status(self) -> pb.RoundStatus:
        return self.good["good-a"].status()

    def incoming(self) -> list[Path]:
        return sorted(self.data_dir.rglob(".incoming-*"))

    def header(self, data: bytes, **overrides: Any) -> pb.PushRequest:
        """A PushHeader that is correct for ``data`` from the ``bad`` client, unless overridden."""
        header = push_header(self.id, "bad", data, rank=BAD_RANK, num_examples=10, round=self.round)
        for name, value in overrides.items():
            setattr(header, name, value)
        return pb.PushRequest(header=header)

    def raw_push(self, messages: Iterable[pb.PushRequest]) -> Any:
        return self.stub.Push(iter(list(messages)), timeout=10)

    def push_good(self, client_id: str) -> None:
        rank, examples, _ = GOOD[client_id]
        tensors = factors(rank, 1000 * self.round + list(GOOD).index(client_id), MODULES)
        result = self.good[client_id].push(tensors, round=self.round, num_examples=examples)
        assert result.round == self.round and not result.duplicate
        self.pushed[client_id] = tensors

    def finish_round(self) -> None:
        """The good clients complete the open round; it must equal the engine on their uploads."""
        for client_id in GOOD:
            if client_id not in self.pushed:
                self.push_good(client_id)
        status = self.good["good-a"].wait_for_round(self.round, timeout=30)
        assert status.round == self.round + 1
        updates = [
            engine_update(cid, *GOOD[cid], t, MODULES) for cid, t in sorted(self.pushed.items())
        ]
        expected = self.strategy.aggregate(self.state, updates)
        store = FileFederationStore(self.data_dir / "federations" / self.id)
        manifest = store.read_manifest(expected.round)
        assert sorted(u.client_id for u in manifest.uploads) == sorted(GOOD)
        published = store.load_published(expected.round, AdapterSchema.from_shapes(MODULES))[0]
        for m in MODULES:
            assert rel_err(published.dense(m), expected.dense(m)) < 1e-5
        # What a client actually pulls carries the same update (scale * B @ A, best rank-r view).
        rank, _, alpha = GOOD["good-b"]
        scale = lora_scaling(alpha, rank)
        pulled = self.good["good-b"].pull()
        view = self.strategy.distribute(expected, rank, scale)
        assert pulled.round == expected.round and pulled.scale == pytest.approx(scale)
        for m in MODULES:
            got = pulled.tensors[tensor_name(m, LORA_B)] @ pulled.tensors[tensor_name(m, LORA_A)]
            assert rel_err(pulled.scale * got, scale * view.factors[m].dense()) < 1e-4
        self.state, self.pushed = expected, {}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    with threaded_server(tmp_path_factory.mktemp("data"), chunk_size=CHUNK) as handle:
        yield handle


@pytest.fixture
def fed(server: ThreadedServer) -> Iterator[Federation]:
    """A new federation (2 expected clients) in which ``good-a`` has already uploaded."""
    fid = f"fed-{next(_ids)}"
    with ExitStack() as stack:
        admin = stack.enter_context(AdminClient(server.target))
        admin.create_federation(
            every_client_spec(fid, MODULES, 2, max_rank=MAX_RANK, init_seed=SEED)
        )

        def joined(cid: str, rank: int, examples: int, alpha: float) -> RafloraClient:
            client = stack.enter_context(RafloraClient(server.target, fid, cid, retry=NO_RETRY))
            client.join(rank=rank, num_examples=examples, lora_alpha=alpha)
            return client

        channel = stack.enter_context(grpc.insecure_channel(server.target))
        strategy = make_strategy(
            "raflora",
            StrategyConfig(schema=AdapterSchema.from_shapes(MODULES), max_rank=MAX_RANK, seed=SEED),
        )
        f = Federation(
            server=server,
            data_dir=server.server.settings.data_dir,
            id=fid,
            good={cid: joined(cid, *params) for cid, params in GOOD.items()},
            bad=joined("bad", BAD_RANK, 10, 16.0),
            stub=pb_grpc.AggregationServiceStub(channel),
            strategy=strategy,
            state=strategy.initial_state(),
            stack=stack,
        )
        f.push_good("good-a")
        yield f


def assert_refused(
    f: Federation,
    action: Callable[[], object],
    method: str,
    code: grpc.StatusCode,
    field_name: str,
) -> None:
    """The shared checks of every bad-input case (see the module docstring)."""
    before = f.status()
    calls = rpc_count(f.server.metrics_url, method, code)
    got, details, exc = refusal(action, "the server accepted bad input")
    assert got == code, details
    assert details.startswith(f"{field_name}: "), details
    if isinstance(exc, RafloraError):
        assert type(exc) is SDK_ERRORS[code]
        assert exc.field == field_name
    after = f.status()
    assert (after.round, after.uploads, after.joined_clients) == (
        before.round,
        before.uploads,
        before.joined_clients,
    )
    assert f.incoming() == []
    # The counter is bumped as the handler unwinds, which may trail the status by a moment.
    assert wait_until(
        lambda: rpc_count(f.server.metrics_url, method, code) == calls + 1, timeout=5.0
    )


# -- one bad push, join, pull or status request each -------------------------------------------


def _tensors_with(change: Callable[[dict[str, Tensor]], None]) -> dict[str, Tensor]:
    tensors = factors(BAD_RANK, 999, MODULES)
    change(tensors)
    return tensors


def _set(name: str, value: Tensor) -> Callable[[dict[str, Tensor]], None]:
    def change(t: dict[str, Tensor]) -> None:
        t[name] = value

    return change


def _poison(name: str, value: float) -> Callable[[dict[str, Tensor]], None]:
    def change(t: dict[str, Tensor]) -> None:
        t[name][1, 1] = value

    return change


def _drop(name: str) -> Callable[[dict[str, Tensor]], None]:
    def change(t: dict[str, Tensor]) -> None:
        del t[name]

    return change


def _sdk_push(change: Callable[[dict[str, Tensor]], None]) -> Callable[[Federation], object]:
    return lambda f: f.bad.push(_tensors_with(change), round=f.round, num_examples=10)


GOOD_BYTES = payload(factors(BAD_RANK, 999, MODULES))
GOOD_SHA = sha256_hex(GOOD_BYTES)
RANK4_BYTES = payload(factors(4, 998, MODULES))
JUNK = bytes(range(256)) * 3  # 768 bytes whose first 8 announce an absurd header length

Case = tuple[str, Callable[[Federation], object], str, grpc.StatusCode, str]
INVALID, DATA_LOSS = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DATA_LOSS
NOT_FOUND, PRECONDITION = grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION
QA, QB = "layers.0.q.lora_A.weight", "layers.0.q.lora_B.weight"
VA, VB = "layers.0.v.lora_A.weight", "layers.0.v.lora_B.weight"

CASES: list[Case] = [
    # The payload itself: size, checksum, format.
    (
        "stream-cut-short",
        lambda f: f.raw_push([f.header(GOOD_BYTES), *chunks(GOOD_BYTES[:-10])]),
        "Push",
        DATA_LOSS,
        "data",
    ),
    (
        "checksum-mismatch",
        lambda f: f.raw_push([f.header(GOOD_BYTES, sha256=sha256_hex(b"x")), *chunks(GOOD_BYTES)]),
        "Push",
        DATA_LOSS,
        "sha256",
    ),
    (
        "more-bytes-than-declared",
        lambda f: f.raw_push(
            [f.header(GOOD_BYTES, total_bytes=len(GOOD_BYTES) - 8), *chunks(GOOD_BYTES)]
        ),
        "Push",
        DATA_LOSS,
        "total_bytes",
    ),
    # The digest as a trailer (the header's sha256 empty): what the SDK sends.
    (
        "trailer-missing",
        lambda f: f.raw_push([f.header(GOOD_BYTES, sha256=""), *chunks(GOOD_BYTES)]),
        "Push",
        INVALID,
        "trailer",
    ),
    (
        "trailer-mismatch",
        lambda f: f.raw_push(
            [f.header(GOOD_BYTES, sha256=""), *chunks(GOOD_BYTES), trailer(sha256_hex(b"x"))]
        ),
        "Push",
        DATA_LOSS,
        "sha256",
    ),
    (
        "trailer-not-hex",
        lambda f: f.raw_push(
            [f.header(GOOD_BYTES, sha256=""), *chunks(GOOD_BYTES), trailer("not-a-digest")]
        ),
        "Push",
        INVALID,
        "sha256",
    ),
    (
        "trailer-after-a-header-digest",
        lambda f: f.raw_push([f.header(GOOD_BYTES), *chunks(GOOD_BYTES), trailer(GOOD_SHA)]),
        "Push",
        INVALID,
        "trailer",
    ),
    (
        "data-after-the-trailer",
        lambda f: f.raw_push(
            [
                f.header(GOOD_BYTES, sha256=""),
                *chunks(GOOD_BYTES)[:-1],
                trailer(GOOD_SHA),
                chunks(GOOD_BYTES)[-1],
            ]
        ),
        "Push",
        INVALID,
        "trailer",
    ),
    (
        "not-safetensors",
        lambda f: f.raw_push([f.header(JUNK), *chunks(JUNK)]),
        "Push",
        INVALID,
        "payload",
    ),
    (
        "chunk-above-chunk-size",
        lambda f: f.raw_push([f.header(GOOD_BYTES * 2), *chunks(GOOD_BYTES * 2, 2 * CHUNK)]),
        "Push",
        INVALID,
        "data",
    ),
    # The tensors: shapes, rank, dtype, values, names.
    ("wrong-shape", _sdk_push(_set(VB, torch.randn(12, 3))), "Push", INVALID, VB),
    (
        "factors-of-another-rank",
        lambda f: f.bad.push(factors(4, 5, MODULES), round=f.round, num_examples=10),
        "Push",
        INVALID,
        QA,
    ),
    (
        "int32-tensor",
        _sdk_push(_set(QB, torch.ones(16, BAD_RANK, dtype=torch.int32))),
        "Push",
        INVALID,
        QB,
    ),
    ("nan", _sdk_push(_poison(VA, math.nan)), "Push", INVALID, VA),
    ("inf", _sdk_push(_poison(QB, math.inf)), "Push", INVALID, QB),
    (
        "unknown-module",
        _sdk_push(_set("layers.9.k.lora_A.weight", torch.zeros(BAD_RANK, 12))),
        "Push",
        INVALID,
        "layers.9.k.lora_A.weight",
    ),
    (
        "not-a-lora-tensor-name",
        _sdk_push(_set("layers.0.q.weight", torch.zeros(16, 12))),
        "Push",
        INVALID,
        "layers.0.q.weight",
    ),
    ("missing-tensor", _sdk_push(_drop(VB)), "Push", INVALID, VB),
    # The header.
    (
        "rank-differs-from-join",
        lambda f: f.raw_push([f.header(RANK4_BYTES, rank=4), *chunks(RANK4_BYTES)]),
        "Push",
        INVALID,
        "rank",
    ),
    (
        "first-message-not-a-header",
        lambda f: f.raw_push(chunks(GOOD_BYTES)),
        "Push",
        INVALID,
        "header",
    ),
    ("empty-stream", lambda f: f.raw_push([]), "Push", INVALID, "header"),
    (
        "second-header",
        lambda f: f.raw_push([f.header(GOOD_BYTES), f.header(GOOD_BYTES)]),
        "Push",
        INVALID,
        "header",
    ),
    (
        "malformed-sha256",
        lambda f: f.raw_push([f.header(GOOD_BYTES, sha256="ABC"), *chunks(GOOD_BYTES)]),
        "Push",
        INVALID,
        "sha256",
    ),
    (
        "declared-size-beyond-any-upload",
        lambda f: f.raw_push([f.header(GOOD_BYTES, total_bytes=1 << 40)]),
        "Push",
        INVALID,
        "total_bytes",
    ),
    (
        "zero-examples",
        lambda f: f.raw_push([f.header(GOOD_BYTES, num_examples=0), *chunks(GOOD_BYTES)]),
        "Push",
        INVALID,
        "num_examples",
    ),
    (
        "negative-alpha",
        lambda f: f.raw_push([f.header(GOOD_BYTES, lora_alpha=-1.0), *chunks(GOOD_BYTES)]),
        "Push",
        INVALID,
        "lora_alpha",
    ),
    # Who and when: federation, client, round.
    (
        "push-unknown-federation",
        lambda f: f.raw_push([f.header(GOOD_BYTES, federation_id="nope"), *chunks(GOOD_BYTES)]),
        "Push",
        NOT_FOUND,
        "federation_id",
    ),
    (
        "join-unknown-federation",
        lambda f: f.client("x", "nope").join(rank=2, num_examples=1),
        "Join",
        NOT_FOUND,
        "federation_id",
    ),
    (
        "status-unknown-federation",
        lambda f: f.client("x", "nope").status(),
        "GetRound",
        NOT_FOUND,
        "federation_id",
    ),
    (
        "push-before-join",
        lambda f: f.raw_push([f.header(GOOD_BYTES, client_id="stranger"), *chunks(GOOD_BYTES)]),
        "Push",
        PRECONDITION,
        "client_id",
    ),
    ("pull-before-join", lambda f: f.client("stranger").pull(), "Pull", PRECONDITION, "client_id"),
    (
        "push-for-a-future-round",
        lambda f: f.raw_push([f.header(GOOD_BYTES, round=f.round + 1), *chunks(GOOD_BYTES)]),
        "Push",
        PRECONDITION,
        "round",
    ),
    # Join.
    (
        "join-rank-above-max",
        lambda f: f.client("late").join(rank=MAX_RANK + 1, num_examples=5),
        "Join",
        INVALID,
        "rank",
    ),
    (
        "join-rank-zero",
        lambda f: f.client("late").join(rank=0, num_examples=5),
        "Join",
        INVALID,
        "rank",
    ),
    (
        "join-nan-alpha",
        lambda f: f.client("late").join(rank=2, num_examples=5, lora_alpha=math.nan),
        "Join",
        INVALID,
        "lora_alpha",
    ),
    (
        "join-bad-client-id",
        lambda f: f.client("../late").join(rank=2, num_examples=5),
        "Join",
        INVALID,
        "client_id",
    ),
]


@pytest.mark.parametrize(
    ("action", "method", "code", "field_name"),
    [pytest.param(*c[1:], id=c[0]) for c in CASES],
)
def test_bad_input_is_refused_and_the_round_goes_on(
    fed: Federation,
    action: Callable[[Federation], object],
    method: str,
    code: grpc.StatusCode,
    field_name: str,
) -> None:
    assert fed.status().uploads == 1
    assert_refused(fed, lambda: action(fed), method, code, field_name)
    fed.finish_round()


def test_push_for_a_closed_round(fed: Federation) -> None:
    """Round 0 is published; an upload still trained from it is refused, naming the round."""
    fed.finish_round()
    fed.push_good("good-a")
    stale = factors(BAD_RANK, 7, MODULES)
    assert_refused(
        fed,
        lambda: fed.bad.push(stale, round=0, num_examples=10),
        "Push",
        grpc.StatusCode.FAILED_PRECONDITION,
        "round",
    )
    fed.finish_round()


def test_conflicting_upload_is_refused_and_an_identical_one_is_a_duplicate(
    fed: Federation,
) -> None:
    """Retries are idempotent; a different second upload must not replace the first."""
    first = fed.pushed["good-a"]
    again = fed.good["good-a"].push(first, round=0, num_examples=GOOD["good-a"][1])
    assert again.duplicate and again.uploads_in_round == 1
    other = factors(GOOD["good-a"][0], 4242, MODULES)
    assert_refused(
        fed,
        lambda: fed.good["good-a"].push(other, round=0, num_examples=GOOD["good-a"][1]),
        "Push",
        grpc.StatusCode.ALREADY_EXISTS,
        "sha256",
    )
    # Nor may the client switch rank for a round it already uploaded to.
    assert_refused(
        fed,
        lambda: fed.good["good-a"].join(rank=4, num_examples=30, lora_alpha=8.0),
        "Join",
        grpc.StatusCode.FAILED_PRECONDITION,
        "rank",
    )
    fed.finish_round()  # aggregates ``first``, the upload that was acknowledged


def test_cancelled_upload_leaves_nothing_behind(fed: Federation) -> None:
    """A client that disappears mid-stream: its partial file is removed and nothing counted."""
    release = threading.Event()

    def stalled() -> Iterator[pb.PushRequest]:
        yield fed.header(GOOD_BYTES)
        yield chunks(GOOD_BYTES, 64)[0]
        release.wait(10)

    call = fed.stub.Push.future(stalled(), timeout=30)
    try:
        assert wait_until(lambda: len(fed.incoming()) == 1, timeout=5.0), "the upload never started"
        # While it hangs half-sent, the server keeps serving everyone else.
        assert fed.good["good-b"].pull().round == 0
        assert fed.status().uploads == 1
    finally:
        call.cancel()
        release.set()
    assert call.cancelled()
    assert wait_until(lambda: fed.incoming() == [], timeout=5.0), fed.incoming()
    status = fed.status()
    assert (status.round, status.uploads) == (0, 1)
    assert not (
        fed.data_dir / "federations" / fed.id / "uploads" / "00000000" / "bad.json"
    ).exists()
    fed.finish_round()


@pytest.mark.parametrize(
    ("overrides", "code", "field_name"),
    [
        pytest.param({"strategy": "fedavg"}, "INVALID_ARGUMENT", "strategy", id="unknown-strategy"),
        pytest.param(
            {"max_rank": 4, "allowed_ranks": [2, 8]},
            "INVALID_ARGUMENT",
            "allowed_ranks",
            id="allowed-rank-above-max",
        ),
        pytest.param(
            {"min_clients": 3, "expected_clients": 2},
            "INVALID_ARGUMENT",
            "expected_clients",
            id="expected-below-min",
        ),
        pytest.param(
            {"federation_id": "../escape"}, "INVALID_ARGUMENT", "federation_id", id="bad-id"
        ),
        pytest.param({"modules": {}}, "INVALID_ARGUMENT", "modules", id="no-modules"),
        pytest.param(
            {"modules": {"m": (0, 4)}}, "INVALID_ARGUMENT", "modules.0.d_out", id="zero-dim"
        ),
        pytest.param({"federation_id": None}, "ALREADY_EXISTS", "federation_id", id="exists"),
    ],
)
def test_bad_federation_spec(
    fed: Federation, overrides: dict[str, Any], code: str, field_name: str
) -> None:
    """CreateFederation refuses, names the field, creates nothing; the running round goes on."""
    args: dict[str, Any] = {"federation_id": f"{fed.id}-new", "modules": MODULES, **overrides}
    fid = args.pop("federation_id") or fed.id
    modules = args.pop("modules")
    before = sorted(p.name for p in (fed.data_dir / "federations").iterdir())
    with AdminClient(fed.server.target) as admin:
        assert_refused(
            fed,
            lambda: admin.create_federation(spec(fid, modules, **args)),
            "CreateFederation",
            grpc.StatusCode[code],
            field_name,
        )
        if fid != fed.id:
            with pytest.raises(NotFoundError):
                admin.get_federation(fid)
    assert sorted(p.name for p in (fed.data_dir / "federations").iterdir()) == before
    fed.finish_round()


def test_a_wrong_layout_is_refused_at_its_first_chunk(fed: Federation) -> None:
    """The safetensors header is checked as soon as it has arrived: an upload of the wrong
    shapes is refused while the rest of it is still unsent (the server holds none of it)."""
    release = threading.Event()
    size = 128
    pieces = chunks(RANK4_BYTES, size)
    header_end = 8 + int.from_bytes(RANK4_BYTES[:8], "little")
    sent = -(-header_end // size)  # the chunks that complete the header
    assert sent < len(pieces)

    def stream() -> Iterator[pb.PushRequest]:
        yield fed.header(RANK4_BYTES)
        yield from pieces[:sent]
        release.wait(30)  # never needed: the refusal comes first
        yield from pieces[sent:]

    started = time.monotonic()
    try:
        assert_refused(
            fed,
            lambda: fed.stub.Push(stream(), timeout=60),
            "Push",
            INVALID,
            f"{next(iter(MODULES))}.lora_A.weight",
        )
    finally:
        release.set()
    assert time.monotonic() - started < 20
    fed.finish_round()
