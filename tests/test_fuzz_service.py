"""Fuzzing the live server (hypothesis): random and mutated protobuf messages, mutated
safetensors payloads, random and mutated credentials.

Every call must end within its deadline with one of the documented status codes, never
INTERNAL or UNKNOWN (no handler crashed) and never a hang; meanwhile a well-behaved client of
another federation keeps getting answers, and at the end it completes a round. The examples
are bounded (and derandomized under CI=true) to keep the suite fast.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from raflora.client_sdk import AdminClient, RafloraClient, RetryPolicy, pb
from raflora.server.testing import ThreadedServer, scrape, threaded_server

from .helpers.adapters import factors
from .helpers.federations import every_client_spec, spec
from .helpers.waiting import wait_until

ADMIN_TOKEN = "fuzz-admin-token-0123456789"
MODULES = {"m0": (16, 12), "m1": (8, 20)}
RANK = 2
CALL_TIMEOUT = 10.0
EXAMPLES = 150
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)
C = grpc.StatusCode
DOCUMENTED = {
    C.OK,
    C.INVALID_ARGUMENT,
    C.NOT_FOUND,
    C.FAILED_PRECONDITION,
    C.ALREADY_EXISTS,
    C.DATA_LOSS,
    C.UNAUTHENTICATED,
    C.PERMISSION_DENIED,
    C.RESOURCE_EXHAUSTED,
}

UNARY = {  # method -> a valid request, serialized, to mutate
    "/raflora.v1.AggregationService/Join": pb.JoinRequest(
        federation_id="fuzz", client_id="j", rank=RANK, num_examples=1
    ),
    "/raflora.v1.AggregationService/GetRound": pb.GetRoundRequest(federation_id="fuzz"),
    "/raflora.v1.AdminService/GetFederation": pb.GetFederationRequest(federation_id="fuzz"),
    "/raflora.v1.AdminService/ListFederations": pb.ListFederationsRequest(),
    "/raflora.v1.AdminService/CreateFederation": pb.CreateFederationRequest(
        spec=spec("fuzz-new", MODULES)
    ),
}
SERVER_STREAMING = {
    "/raflora.v1.AggregationService/Pull": pb.PullRequest(federation_id="fuzz", client_id="fuzzer"),
    "/raflora.v1.AggregationService/WatchRounds": pb.WatchRoundsRequest(federation_id="fuzz"),
}
PUSH = "/raflora.v1.AggregationService/Push"


VALID_PAYLOAD: bytes = save(factors(RANK, 0, MODULES))
HEADER_LEN = struct.unpack("<Q", VALID_PAYLOAD[:8])[0]


class ErrorLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(self.format(record))


@dataclass
class Fuzz:
    server: ThreadedServer
    channel: grpc.Channel
    credentials: dict[str, str]  # kind -> credential
    errors: ErrorLog
    codes: dict[str, set[grpc.StatusCode]] = field(default_factory=dict)
    fields: dict[str, set[str]] = field(default_factory=dict)  # the fields refusals named

    def record(self, method: str, code: grpc.StatusCode, details: str) -> None:
        name = method.rsplit("/", 1)[-1]
        self.codes.setdefault(name, set()).add(code)
        head, sep, _ = details.partition(": ")
        if sep:
            self.fields.setdefault(name, set()).add(head)


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzz]:
    errors = ErrorLog()
    logging.getLogger("raflora.server").addHandler(errors)
    with (
        threaded_server(
            tmp_path_factory.mktemp("fuzz"),
            admin_token=ADMIN_TOKEN,
            chunk_size=1024,
            max_pushes_per_round=1000,
            idle_stream_timeout_seconds=2.0,
        ) as server,
        ExitStack() as stack,
    ):
        admin = stack.enter_context(AdminClient(server.target, admin_token=ADMIN_TOKEN))
        secret = admin.create_federation(
            every_client_spec("fuzz", MODULES, 50, max_rank=4), open_enrolment=True
        ).enrolment_secret
        fuzzer = stack.enter_context(
            RafloraClient(server.target, "fuzz", "fuzzer", enrolment_secret=secret)
        )
        fuzzer.join(rank=RANK, num_examples=5)
        assert fuzzer.token is not None
        channel = stack.enter_context(grpc.insecure_channel(server.target))
        yield Fuzz(
            server,
            channel,
            {"admin": ADMIN_TOKEN, "secret": secret, "token": fuzzer.token},
            errors,
        )
    logging.getLogger("raflora.server").removeHandler(errors)


Draw = Callable[[st.SearchStrategy[Any]], Any]


def mutate(data: bytes, draw: Draw) -> bytes:
    """Flip, drop, insert, truncate or extend bytes of ``data``."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "drop", "insert", "truncate", "extend", "overwrite"]))
        at = draw(st.integers(0, max(len(out) - 1, 0)))
        if op == "flip" and out:
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "drop" and out:
            del out[at]
        elif op == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "truncate":
            del out[at:]
        elif op == "extend":
            out += draw(st.binary(min_size=1, max_size=64))
        elif op == "overwrite":
            piece = draw(st.binary(min_size=1, max_size=16))
            out[at : at + len(piece)] = piece
    return bytes(out)


def right_credential(method: str) -> str:
    if "AdminService" in method:
        return "admin"
    return "secret" if method.endswith("/Join") else "token"


@st.composite
def metadata(
    draw: st.DrawFn, credentials: dict[str, str], method: str
) -> tuple[tuple[str, str], ...] | None:
    """Half the time the credential the method needs, else none, another or a damaged one."""
    if draw(st.booleans()):
        return (("authorization", f"Bearer {credentials[right_credential(method)]}"),)
    kind = draw(st.sampled_from(["none", "admin", "secret", "token", "mutated", "random"]))
    if kind == "none":
        return None
    if kind in credentials:
        value = credentials[kind]
    elif kind == "mutated":
        chars = list(credentials["token"])
        at = draw(st.integers(0, len(chars) - 1))
        chars[at] = draw(st.sampled_from("ABCxyz019-_."))
        value = "".join(chars)
    else:
        value = draw(st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=80))
    scheme = draw(st.sampled_from(["Bearer ", "bearer ", "Basic ", ""]))
    return (("authorization", f"{scheme}{value}"),)


@st.composite
def safetensors_payload(draw: st.DrawFn) -> bytes:
    """A valid upload, then mutated where it hurts: header JSON, length prefix, data."""
    kind = draw(
        st.sampled_from(["valid", "bytes", "header-json", "length-prefix", "data", "random"])
    )
    if kind == "valid":
        return VALID_PAYLOAD
    if kind == "bytes":
        return mutate(VALID_PAYLOAD, draw)
    if kind == "random":
        return draw(st.binary(min_size=1, max_size=4096))
    header = json.loads(VALID_PAYLOAD[8 : 8 + HEADER_LEN])
    body = VALID_PAYLOAD[8 + HEADER_LEN :]
    if kind == "length-prefix":
        length = draw(st.sampled_from([0, 1, HEADER_LEN + 1, 2**31, 2**63 - 1, 2**64 - 1]))
        return struct.pack("<Q", length) + VALID_PAYLOAD[8:]
    if kind == "data":
        return VALID_PAYLOAD[: 8 + HEADER_LEN] + mutate(body, draw)
    name = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    entry = header[name]
    change = draw(st.sampled_from(["dtype", "shape", "offsets", "rename", "drop", "junk"]))
    if change == "dtype":
        entry["dtype"] = draw(st.sampled_from(["F16", "I64", "BOOL", "U8", "F8_E4M3", "Q"]))
    elif change == "shape":
        entry["shape"] = draw(st.lists(st.integers(-2, 2**40), max_size=4))
    elif change == "offsets":
        entry["data_offsets"] = draw(st.lists(st.integers(-1, 2**62), min_size=2, max_size=2))
    elif change == "rename":
        header[draw(st.text(max_size=40))] = header.pop(name)
    elif change == "drop":
        del header[name]
    else:
        header[name] = draw(st.one_of(st.none(), st.integers(), st.text(max_size=10)))
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def call_code(fuzz: Fuzz, method: str, action: Any) -> grpc.StatusCode:
    started = time.monotonic()
    details = ""
    try:
        action()
        code = C.OK
    except grpc.RpcError as exc:
        assert isinstance(exc, grpc.Call)
        code, details = exc.code(), exc.details() or ""
        assert code in DOCUMENTED, (method, code, details)
    assert time.monotonic() - started < CALL_TIMEOUT, f"{method} took too long"
    fuzz.record(method, code, details)
    return code


@given(data=st.data())
@FUZZ_SETTINGS
def test_random_and_mutated_requests(fuzz: Fuzz, data: st.DataObject, victim: Victim) -> None:
    method = data.draw(st.sampled_from(sorted({**UNARY, **SERVER_STREAMING})))
    valid = {**UNARY, **SERVER_STREAMING}[method].SerializeToString()
    kind = data.draw(st.sampled_from(["valid", "random", "mutated", "mutated", "empty"]))
    if kind == "valid":
        body = valid
    elif kind == "random":
        body = data.draw(st.binary(max_size=256))
    elif kind == "mutated":
        body = mutate(valid, data.draw)
    else:
        body = b""
    md = data.draw(metadata(fuzz.credentials, method))
    identity: Any = None
    if method in UNARY:
        call = fuzz.channel.unary_unary(
            method, request_serializer=identity, response_deserializer=identity
        )
        call_code(fuzz, method, lambda: call(body, timeout=CALL_TIMEOUT, metadata=md))
    else:
        stream_call = fuzz.channel.unary_stream(
            method, request_serializer=identity, response_deserializer=identity
        )

        def first_messages() -> None:
            responses: Any = stream_call(body, timeout=CALL_TIMEOUT, metadata=md)
            try:
                for _ in responses:
                    if method.endswith("WatchRounds"):
                        break  # an open watch is fine; don't wait for further events
            finally:
                responses.cancel()

        call_code(fuzz, method, first_messages)


@st.composite
def push_stream(draw: st.DrawFn, fuzz: Fuzz) -> list[bytes]:
    payload = draw(safetensors_payload())
    fields: dict[str, Any] = {
        "federation_id": "fuzz",
        "client_id": "fuzzer",
        "round": 0,
        "rank": RANK,
        "num_examples": 5,
        "lora_alpha": 0.0,
        "total_bytes": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
    }
    if draw(st.integers(0, 2)) == 0:  # a third of the streams get one header field wrong
        name, value = draw(
            st.sampled_from(
                [
                    ("federation_id", "victim"),
                    ("federation_id", "nope"),
                    ("federation_id", ""),
                    ("client_id", "good"),
                    ("client_id", "x/../y"),
                    ("round", 1),
                    ("round", 2**63),
                    ("rank", 4),
                    ("rank", 0),
                    ("rank", 2**31),
                    ("num_examples", 0),
                    ("lora_alpha", -1.0),
                    ("lora_alpha", float("nan")),
                    ("lora_alpha", float("inf")),
                    ("total_bytes", 0),
                    ("total_bytes", len(payload) + 1),
                    ("total_bytes", max(len(payload) - 1, 0)),
                    ("total_bytes", 2**64 - 1),
                    ("sha256", ""),
                    ("sha256", "0" * 64),
                    ("sha256", "Z" * 64),
                ]
            )
        )
        fields[name] = value
    header = pb.PushHeader(**fields)
    messages = [pb.PushRequest(header=header).SerializeToString()]
    chunk = draw(st.sampled_from([1024, 1024, 512, 2048]))  # 2048 > the server's chunk_size
    messages += [
        pb.PushRequest(data=payload[i : i + chunk]).SerializeToString()
        for i in range(0, len(payload), chunk)
    ]
    for _ in range(draw(st.integers(0, 2))):  # raw damage to the protobuf messages themselves
        at = draw(st.integers(0, len(messages) - 1))
        messages[at] = mutate(messages[at], draw)
    if draw(st.integers(0, 9)) == 0:
        messages.insert(draw(st.integers(0, len(messages))), messages[0])  # a second header
    return messages


@given(data=st.data())
@FUZZ_SETTINGS
def test_mutated_push_streams_and_payloads(fuzz: Fuzz, data: st.DataObject, victim: Victim) -> None:
    messages = data.draw(push_stream(fuzz))
    md = data.draw(
        st.one_of(
            st.just((("authorization", f"Bearer {fuzz.credentials['token']}"),)),
            metadata(fuzz.credentials, PUSH),
        )
    )
    identity: Any = None
    push = fuzz.channel.stream_unary(
        PUSH, request_serializer=identity, response_deserializer=identity
    )
    call_code(fuzz, PUSH, lambda: push(iter(messages), timeout=CALL_TIMEOUT, metadata=md))


@dataclass
class Victim:
    """A client of another federation that keeps asking for the round status meanwhile."""

    client: RafloraClient
    other: RafloraClient
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)


@pytest.fixture(scope="module")
def victim(fuzz: Fuzz) -> Iterator[Victim]:
    target = fuzz.server.target
    with (
        AdminClient(target, admin_token=ADMIN_TOKEN) as admin,
        ExitStack() as stack,
    ):
        secret = admin.create_federation(
            every_client_spec("victim", MODULES, 2, max_rank=4), open_enrolment=True
        ).enrolment_secret
        retry = RetryPolicy(attempts=1)
        clients = [
            stack.enter_context(
                RafloraClient(target, "victim", cid, enrolment_secret=secret, retry=retry)
            )
            for cid in ("good", "other")
        ]
        for client in clients:
            client.join(rank=RANK, num_examples=5)
        v = Victim(clients[0], clients[1])

        def poll() -> None:
            while not v.stop.is_set():
                started = time.monotonic()
                try:
                    v.client.status()
                except Exception as exc:
                    v.failures.append(repr(exc))
                v.latencies.append(time.monotonic() - started)
                v.stop.wait(0.01)

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        yield v
        v.stop.set()
        thread.join(10)


def test_the_server_is_unharmed(fuzz: Fuzz, victim: Victim) -> None:
    """Runs last in this module: the fuzzing left no damage and no crash behind."""
    assert victim.failures == []
    assert len(victim.latencies) > 10 and max(victim.latencies) < 2.0
    assert (
        victim.client.push(factors(RANK, 1, MODULES), round=0, num_examples=5).uploads_in_round == 1
    )
    assert (
        victim.other.push(factors(RANK, 2, MODULES), round=0, num_examples=5).uploads_in_round == 2
    )
    assert victim.client.wait_for_round(0, timeout=30).round == 1
    assert victim.client.pull().round == 1
    data_dir = fuzz.server.server.settings.data_dir
    wait_until(lambda: not list(data_dir.rglob(".incoming-*")), timeout=5, interval=0.05)
    assert not list(data_dir.rglob(".incoming-*"))
    metrics = scrape(fuzz.server.metrics_url)
    # Error counters exist at 0 from the start (pre-initialised): none may have moved.
    internal = re.findall(r'_total\{[^}]*code="(?:INTERNAL|UNKNOWN)"[^}]*\} (\S+)', metrics)
    assert internal and all(float(v) == 0 for v in internal), internal
    assert fuzz.errors.records == []
    # The fuzzing reached past the front door: payloads were read, hashed and validated.
    deep = {"payload", "data", "sha256", *(f"{m}.lora_{f}.weight" for m in MODULES for f in "AB")}
    assert fuzz.fields.get("Push", set()) & deep, fuzz.fields
    assert {C.OK, C.INVALID_ARGUMENT, C.UNAUTHENTICATED} <= set().union(*fuzz.codes.values())
    print("status codes seen:", {m: sorted(c.name for c in s) for m, s in fuzz.codes.items()})
