"""The streamed safetensors layout and the fast data framing, against independent parsers.

The references are the safetensors library (for the payload format) and the protobuf runtime
(for the wire form of data messages): whatever our code writes, they must read back the same;
whatever our parser accepts, safetensors must accept too.
"""

from __future__ import annotations

import json
import random
import struct

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from raflora.client_sdk import pb
from raflora.client_sdk.payload import PushPayload, receive_adapter
from raflora.v1.framing import data_of, data_or_message, encode_data, serializer
from raflora.v1.layout import LayoutError, TensorSplitter, parse_header

from .helpers.adapters import factors

MODULES = {"layers.0.q": (24, 18), "layers.1.v": (14, 30)}


def mixed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "a": torch.randn(5, 7, generator=g),
        "empty": torch.zeros(0, 4),
        "half": torch.randn(33, generator=g).half(),
        "bf": torch.randn(3, 3, generator=g).bfloat16(),
        "double": torch.randn(2, 9, generator=g).double(),
        "scalar": torch.tensor(2.5),
        "ints": torch.arange(11, dtype=torch.int64),
    }


def test_push_payload_is_the_safetensors_that_the_library_reads() -> None:
    tensors = mixed_tensors()
    payload = PushPayload(tensors)
    data = payload.to_bytes()
    assert len(data) == payload.total_bytes
    back = load(data)
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t)


@pytest.mark.parametrize("chunk", [64, 100, 1024, 1 << 20])
def test_push_messages_are_protobuf_data_messages_and_a_trailer(chunk: int) -> None:
    import hashlib

    tensors = factors(4, 0, MODULES)
    payload = PushPayload(tensors)
    messages = list(payload.messages(chunk))
    *data, last = messages
    parsed = [pb.PushRequest.FromString(m) for m in data]  # type: ignore[arg-type]
    assert all(p.WhichOneof("payload") == "data" and len(p.data) <= chunk for p in parsed)
    joined = b"".join(p.data for p in parsed)
    assert joined == payload.to_bytes()
    assert isinstance(last, pb.PushRequest) and last.WhichOneof("payload") == "trailer"
    assert last.trailer.sha256 == hashlib.sha256(joined).hexdigest()


def test_a_tensor_that_fits_a_message_is_never_cut() -> None:
    tensors = factors(4, 0, MODULES)
    payload = PushPayload(tensors)
    chunk = max(t.numel() * t.element_size() for t in tensors.values()) + 16
    bounds = {0}
    position = 0
    for m in payload.messages(chunk):
        if isinstance(m, bytes):
            position += len(pb.PushRequest.FromString(m).data)
            bounds.add(position)
    starts = [payload.layout.data_start + e.start for e in payload.layout.entries]
    ends = [payload.layout.data_start + e.end for e in payload.layout.entries]
    for start, end in zip(starts, ends, strict=True):
        inside = [b for b in bounds if start < b < end]
        assert not inside, f"a message boundary cuts the tensor at {start}..{end}"


def test_data_framing_matches_protobuf() -> None:
    rng = random.Random(0)
    for size in [0, 1, 127, 128, 300, 16383, 16384, 1 << 20]:
        body = rng.randbytes(size)
        pieces: list[bytes | memoryview] = [body[: size // 3], memoryview(body)[size // 3 :]]
        wire = encode_data(pieces)
        assert pb.PushRequest.FromString(wire).data == body
        assert pb.PullChunk.FromString(wire).data == body
        assert wire == pb.PushRequest(data=body).SerializeToString()
        view = data_of(wire)
        assert view is not None and bytes(view) == body


def test_other_encodings_go_to_the_protobuf_parser() -> None:
    body = b"abc"
    header = pb.PushRequest(header=pb.PushHeader(client_id="x")).SerializeToString()
    twice = encode_data([body]) + encode_data([b"zz"])  # repeated field: protobuf keeps the last
    with_unknown = encode_data([body]) + b"\x28\x01"  # plus field 5 (varint)
    parse = data_or_message(pb.PushRequest)
    assert data_of(header) is None and parse(header).header.client_id == "x"
    assert data_of(twice) is None and parse(twice).data == b"zz"
    assert data_of(with_unknown) is None and parse(with_unknown).data == body
    assert data_of(b"\x12\x05ab") is None  # a length past the end: not a data message
    with pytest.raises(Exception):  # noqa: B017 (protobuf's DecodeError)
        parse(b"\x12\x05ab")
    assert serializer(pb.PushRequest)(b"raw") == b"raw"
    with pytest.raises(TypeError):
        serializer(pb.PushRequest)(pb.PullRequest())


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 1000, 1 << 20])
def test_the_splitter_hands_over_each_tensor_exactly(chunk: int) -> None:
    tensors = mixed_tensors()
    data = save(tensors)
    splitter = TensorSplitter(len(data), 1 << 20)
    got: dict[str, bytes] = {}
    for start in range(0, len(data), chunk):
        for entry, view in splitter.feed(data[start : start + chunk]):
            assert entry.name not in got
            got[entry.name] = bytes(view)
    layout = splitter.close()
    assert {e.name for e in layout.entries} == tensors.keys() == got.keys()
    for name, t in tensors.items():
        assert got[name] == t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def test_the_splitter_refuses_short_and_long_payloads() -> None:
    data = save(mixed_tensors())
    short = TensorSplitter(len(data), 1 << 20)
    short.feed(data[:-1])
    with pytest.raises(LayoutError, match="ended after"):
        short.close()
    long = TensorSplitter(len(data) - 1, 1 << 20)
    with pytest.raises(LayoutError):
        long.feed(data)
    small_limit = TensorSplitter(len(data), 16)
    with pytest.raises(LayoutError, match="exceeds the limit"):
        small_limit.feed(data)


def _payload(header: object, data: bytes = b"", raw: bytes | None = None) -> bytes:
    blob = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


ENTRY = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
HOSTILE = {
    "not-json": _payload(None, bytes(8), raw=b"{not json"),
    "not-an-object": _payload(None, b"", raw=b"[1, 2]"),
    "gap": _payload({"a": {**ENTRY, "data_offsets": [4, 12]}}, bytes(12)),
    "overlap": _payload(
        {"a": ENTRY, "b": {**ENTRY, "data_offsets": [4, 12]}},
        bytes(12),
    ),
    "short-data": _payload({"a": ENTRY}, bytes(4)),
    "trailing-data": _payload({"a": ENTRY}, bytes(12)),
    "size-disagrees-with-shape": _payload({"a": {**ENTRY, "shape": [3]}}, bytes(8)),
    "unknown-dtype": _payload({"a": {**ENTRY, "dtype": "F128"}}, bytes(8)),
    "negative-shape": _payload({"a": {**ENTRY, "shape": [-2]}}, bytes(8)),
    "end-before-start": _payload({"a": {**ENTRY, "data_offsets": [8, 0]}}, bytes(8)),
    "header-past-the-end": struct.pack("<Q", 1 << 40) + b"{}",
    "metadata-not-strings": _payload({"__metadata__": {"k": 1}, "a": ENTRY}, bytes(8)),
}
STRICTER = {  # the safetensors library may take these; the server does not
    "leading-space": _payload(None, bytes(8), raw=b' {"a": ' + json.dumps(ENTRY).encode() + b"}"),
    "duplicate-key": _payload(
        None, bytes(8), raw=b'{"a": %s, "a": %s}' % ((json.dumps(ENTRY).encode(),) * 2)
    ),
    "extra-key": _payload({"a": {**ENTRY, "extra": 1}}, bytes(8)),
    "bool-in-shape": _payload({"a": {**ENTRY, "shape": [True, 2]}}, bytes(8)),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_malformed_header_is_refused_as_the_library_refuses_it(name: str) -> None:
    data = HOSTILE[name]
    with pytest.raises(LayoutError):
        parse_header(data, len(data))
    with pytest.raises((SafetensorError, ValueError, RuntimeError)):
        load(data)


@pytest.mark.parametrize("name", sorted(STRICTER))
def test_ambiguous_headers_are_refused(name: str) -> None:
    data = STRICTER[name]
    with pytest.raises(LayoutError):
        parse_header(data, len(data))


def test_whatever_the_parser_accepts_the_library_reads_the_same() -> None:
    rng = random.Random(7)
    codes = {"F32": torch.float32, "F16": torch.float16, "F64": torch.float64, "I64": torch.int64}
    for _ in range(50):
        tensors = {
            f"t{i}": torch.zeros([rng.randint(0, 4) for _ in range(rng.randint(0, 3))]).to(
                rng.choice(list(codes.values()))
            )
            for i in range(rng.randint(0, 6))
        }
        data = save(tensors) if tensors else _payload({}, b"")
        layout = parse_header(data, len(data))
        back = load(data)
        assert {e.name for e in layout.entries} == back.keys()
        for e in layout.entries:
            assert codes[e.dtype] == back[e.name].dtype and e.shape == tuple(back[e.name].shape)


def test_a_pull_is_assembled_into_one_buffer_of_views() -> None:
    tensors = mixed_tensors()
    data = save(tensors)
    import hashlib

    header = pb.PullHeader(
        round=3, rank=4, total_bytes=len(data), sha256=hashlib.sha256(data).hexdigest()
    )
    stream = [pb.PullChunk(header=header)] + [
        memoryview(data)[i : i + 50] for i in range(0, len(data), 50)
    ]
    got_header, got = receive_adapter(stream)
    assert got_header.round == 3 and got.keys() == tensors.keys()
    pointers = set()
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t)
        if got[name].numel():
            pointers.add(got[name].untyped_storage().data_ptr())
    assert len(pointers) == 1  # one buffer, no per-tensor copies (safetensors aligns to 8)


def test_a_pull_that_lies_is_data_loss() -> None:
    from raflora.client_sdk import DataLossError

    data = save(mixed_tensors())
    good = pb.PullHeader(total_bytes=len(data), sha256="0" * 64)
    with pytest.raises(DataLossError, match="checksum"):
        receive_adapter([pb.PullChunk(header=good), memoryview(data)])
    with pytest.raises(DataLossError, match="more than"):
        receive_adapter([pb.PullChunk(header=good), memoryview(data + b"x")])
    with pytest.raises(DataLossError, match="before the header"):
        receive_adapter([memoryview(data)])
