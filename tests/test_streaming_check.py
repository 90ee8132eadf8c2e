"""The checks a push meets as its bytes arrive decide exactly as the read-back checks did.

The reference is ``validate_upload`` over the whole payload (the path every upload took before,
whose cases ``test_service_errors`` and ``test_trust_boundary`` pin down). For each payload,
good or hostile, in any chunking and in both tensor orders, the streaming check must accept
the same payloads and refuse the others with the same error type naming the same field.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save
from torch import Tensor

from raflora.client_sdk.payload import PushPayload
from raflora.server.engine import AdapterSchema, AggregationError, InvalidUpdateError
from raflora.server.rounds.intake import UploadIntake
from raflora.server.storage.store import FileUploadSink
from raflora.server.storage.tensorio import (
    StreamingUploadCheck,
    UpdateBounds,
    open_bytes,
    validate_upload,
)
from raflora.v1.wire import LORA_A, LORA_B, tensor_name

from .helpers.adapters import factors

MODULES = {"layers.0.q": (24, 18), "layers.1.v": (14, 30), "layers.2.o": (9, 9)}
SCHEMA = AdapterSchema.from_shapes(MODULES)
RANK = 4
SCALE = 2.0
Q, V = "layers.0.q", "layers.1.v"


def good() -> dict[str, Tensor]:
    return factors(RANK, 1, MODULES)


def _largest_norm(tensors: dict[str, Tensor]) -> float:
    return max(
        float(
            torch.linalg.norm(
                SCALE * tensors[tensor_name(m, LORA_B)] @ tensors[tensor_name(m, LORA_A)]
            )
        )
        for m in MODULES
    )


# Twice the good upload's largest module: the honest case passes with room to spare.
BOUNDS = UpdateBounds(max_update_norm=2 * _largest_norm(good()))


def changed(change: Callable[[dict[str, Tensor]], None]) -> dict[str, Tensor]:
    t = good()
    change(t)
    return t


def put(name: str, value: Tensor) -> Callable[[dict[str, Tensor]], None]:
    return lambda t: t.__setitem__(name, value)


def poke(name: str, value: float) -> Callable[[dict[str, Tensor]], None]:
    def change(t: dict[str, Tensor]) -> None:
        x = t[name].clone()
        x.view(-1)[x.numel() // 2] = value
        t[name] = x

    return change


def cancelling(t: dict[str, Tensor]) -> None:
    """‖B‖_F·‖A‖_F far past the bound, yet B·A = 0: only the exact check may decide."""
    b = torch.zeros(24, RANK)
    b[:, 0] = b[:, 1] = 10.0
    a = torch.zeros(RANK, 18)
    a[0], a[1] = 10.0, -10.0
    t[tensor_name(Q, LORA_B)], t[tensor_name(Q, LORA_A)] = b, a


def just_past(t: dict[str, Tensor]) -> None:
    """A rank-one module whose exact ‖s·B·A‖_F is just above the bound."""
    b = torch.zeros(24, RANK)
    a = torch.zeros(RANK, 18)
    b[0, 0], a[0, 0] = 1.0, BOUNDS.max_update_norm / SCALE * 1.001
    t[tensor_name(Q, LORA_B)], t[tensor_name(Q, LORA_A)] = b, a


CASES: dict[str, dict[str, Tensor]] = {
    "good": good(),
    "good-fp16": {k: v.half() for k, v in good().items()},
    "good-bf16-and-fp64": {
        k: (v.bfloat16() if LORA_A in k else v.double()) for k, v in good().items()
    },
    "cancelling-factors": changed(cancelling),
    "norm-just-past-the-bound": changed(just_past),
    "nan-in-B": changed(poke(tensor_name(V, LORA_B), math.nan)),
    "inf-in-A": changed(poke(tensor_name(Q, LORA_A), -math.inf)),
    "huge-after-scaling": changed(poke(tensor_name(V, LORA_B), 1e15)),
    "fp64-beyond-fp32": {
        **good(),
        tensor_name(Q, LORA_A): torch.full((RANK, 18), 1e300, dtype=torch.float64),
    },
    "norm-past-the-bound": changed(poke(tensor_name(V, LORA_A), 1e4)),
    "wrong-shape": changed(put(tensor_name(V, LORA_A), torch.zeros(RANK + 1, 30))),
    "missing-tensor": {k: v for k, v in good().items() if k != tensor_name(Q, LORA_B)},
    "unknown-tensor": {**good(), "layers.9.x.lora_A.weight": torch.zeros(RANK, 3)},
    "merge-tensor": {**good(), f"{Q}.merge.lora_A.weight": torch.zeros(1, 18)},
    "int-dtype": changed(put(tensor_name(Q, LORA_A), torch.zeros(RANK, 18, dtype=torch.int32))),
    "not-a-lora-name": {**good(), "bias": torch.zeros(3)},
}


def verdict_of(error: BaseException | None) -> tuple[str, str] | None:
    if error is None:
        return None
    assert isinstance(error, AggregationError), error
    return type(error).__name__, error.field


def reference(data: bytes) -> tuple[str, str] | None:
    try:
        with open_bytes(data) as reader:
            validate_upload(reader, SCHEMA, RANK, "c", SCALE, BOUNDS)
    except AggregationError as exc:
        return verdict_of(exc)
    return None


def streamed(data: bytes, chunk: int, hold_budget: int | None = None) -> tuple[str, str] | None:
    check = StreamingUploadCheck(SCHEMA, RANK, "c", SCALE, BOUNDS, len(data))
    if hold_budget is not None:
        check.HOLD_BUDGET_BYTES = hold_budget
    try:
        for start in range(0, len(data), chunk):
            check.feed(memoryview(data)[start : start + chunk])
        check.close()
    except AggregationError as exc:
        return verdict_of(exc)
    return None


def encodings(tensors: dict[str, Tensor]) -> dict[str, bytes]:
    """The SDK's layout (its order), safetensors' own, and all A factors before all B."""
    a_first = dict(sorted(tensors.items(), key=lambda kv: (LORA_B in kv[0], kv[0])))
    return {
        "sdk": PushPayload(tensors).to_bytes(),
        "safetensors": save(tensors),
        "a-first": PushPayload(a_first).to_bytes(),
    }


@pytest.mark.parametrize("case", sorted(CASES))
def test_streaming_checks_decide_as_the_read_back_checks(case: str) -> None:
    for label, data in encodings(CASES[case]).items():
        expected = reference(data)
        for chunk in (7, 100, 4096, len(data)):
            for budget in (None, 0):  # 0: every first factor leaves only its Gram
                got = streamed(data, chunk, budget)
                assert got == expected, f"{case} ({label}, chunk {chunk}, budget {budget})"
    if case.startswith("good") or case == "cancelling-factors":
        assert expected is None
    else:
        assert expected is not None


def test_the_scalar_terms_are_checked_before_any_byte() -> None:
    with pytest.raises(InvalidUpdateError, match="scale"):
        StreamingUploadCheck(SCHEMA, RANK, "c", math.inf, BOUNDS, 100)
    with pytest.raises(AggregationError, match="rank"):
        StreamingUploadCheck(SCHEMA, 0, "c", SCALE, BOUNDS, 100)


def test_the_intake_writes_hashes_and_checks_every_byte(tmp_path: Path) -> None:
    data = PushPayload(good()).to_bytes()

    async def run() -> tuple[str, int]:
        sink = FileUploadSink(tmp_path / "upload")
        intake = UploadIntake(
            sink, StreamingUploadCheck(SCHEMA, RANK, "c", SCALE, BOUNDS, len(data)), window=2
        )
        for start in range(0, len(data), 333):
            await intake.put(memoryview(data)[start : start + 333])
        digest = await intake.finish()
        assert intake.layout is not None and len(intake.layout.entries) == 2 * len(MODULES)
        with sink.tensors() as reader:
            names = set(reader.keys())
        intake.close()
        await asyncio.sleep(0.05)  # the close runs on the writer lane
        return digest, len(names)

    digest, names = asyncio.run(run())
    assert digest == hashlib.sha256(data).hexdigest() and names == 2 * len(MODULES)
    assert not (tmp_path / "upload").exists()  # closed without a commit: forgotten


def test_the_intake_stops_at_the_first_bad_byte_and_forgets_the_upload(tmp_path: Path) -> None:
    data = PushPayload(CASES["wrong-shape"]).to_bytes()

    async def run() -> int:
        sink = FileUploadSink(tmp_path / "upload")
        check = StreamingUploadCheck(SCHEMA, RANK, "c", SCALE, BOUNDS, len(data))
        intake = UploadIntake(sink, check, window=1)
        sent = 0
        with pytest.raises(AggregationError, match="shape"):
            for start in range(0, len(data), 64):
                await intake.put(memoryview(data)[start : start + 64])
                sent += 64
                await asyncio.sleep(0)  # let the lanes run, as the network would
        intake.close()
        for _ in range(100):
            if not (tmp_path / "upload").exists():
                break
            await asyncio.sleep(0.01)
        return sent

    sent = asyncio.run(run())
    assert sent < len(data)  # refused before the payload was through
    assert not (tmp_path / "upload").exists()


def test_a_header_is_checked_before_any_buffer_is_sized_from_it() -> None:
    """A header naming one tensor as large as the payload, with data in the same chunk: it is
    refused before the splitter gathers (and zero-fills) a buffer of that size."""
    import json
    import struct
    import tracemalloc

    total = 256 << 20
    header = json.dumps(
        {
            tensor_name(Q, LORA_A): {
                "dtype": "F32",
                "shape": [total // 4],
                "data_offsets": [0, total],
            }
        }
    ).encode()
    header += b" " * (-len(header) % 8)
    prefix = struct.pack("<Q", len(header)) + header
    check = StreamingUploadCheck(SCHEMA, RANK, "c", SCALE, BOUNDS, len(prefix) + total)
    tracemalloc.start()
    try:
        with pytest.raises(AggregationError):
            check.feed(prefix + bytes(64))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak} bytes allocated for a refused header"


def test_the_cheap_bounds_margin_covers_fp32_rounding() -> None:
    """fp32 dot products lose small terms after large ones; the margin the cheap bound must
    clear covers the worst of it, so near the limit the exact check decides.

    B has 64 ones, then 2¹⁸ terms whose squares fall below fp32's resolution of the running
    sum. The module is rank 1, so ‖BA‖_F = ‖B‖_F‖A‖_F exactly."""
    from raflora.server.storage.tensorio import _Factor

    n = 64 + (1 << 18)
    b = torch.full((n, 1), 2.0**-12.5)
    b[:64] = 1.0
    a = torch.zeros(1, 4)
    a[0, 0] = 1.0
    exact = float((b.double() ** 2).sum())
    factor = _Factor.of(b, rows=False)
    assert abs(factor.sq_norm - exact) / exact <= factor.rel_error
    true_norm = math.sqrt(exact)
    schema = AdapterSchema.from_shapes({"m": (n, 4)})
    data = PushPayload({tensor_name("m", LORA_B): b, tensor_name("m", LORA_A): a}).to_bytes()
    for limit in (true_norm * 0.95, true_norm * 1.05):
        bounds = UpdateBounds(max_update_norm=limit)
        verdicts: list[str | None] = []
        try:
            with open_bytes(data) as reader:
                validate_upload(reader, schema, 1, "c", 1.0, bounds)
            verdicts.append(None)
        except InvalidUpdateError as exc:
            verdicts.append(exc.field)
        check = StreamingUploadCheck(schema, 1, "c", 1.0, bounds, len(data))
        try:
            for start in range(0, len(data), 1 << 16):
                check.feed(memoryview(data)[start : start + (1 << 16)])
            check.close()
            verdicts.append(None)
        except InvalidUpdateError as exc:
            verdicts.append(exc.field)
        assert verdicts == ([None, None] if limit > true_norm else ["m", "m"])


class _SlowAbortSink(FileUploadSink):
    """A sink whose abort takes a while, as a busy disk or a bucket would."""

    def abort(self) -> None:
        time.sleep(0.3)
        super().abort()


def test_a_discarded_upload_is_gone_before_the_refusal_goes_out(tmp_path: Path) -> None:
    """The refusal paths await ``discard``: once it returns, the bytes are forgotten, however
    slowly the sink deletes them (``close`` alone returns at once and deletes later)."""
    data = PushPayload(good()).to_bytes()

    async def run(wait: float) -> bool:
        path = tmp_path / f"upload-{wait}"
        intake = UploadIntake(_SlowAbortSink(path), None, window=2)
        await intake.put(memoryview(data))
        await intake.discard(wait)
        left = path.exists()
        await intake._writer.idle()  # the abort finishes in the background either way
        assert not path.exists()
        return left

    assert asyncio.run(run(5.0)) is False
    assert asyncio.run(run(0.01)) is True  # past its wait it returns, leaving the rest behind


@pytest.mark.parametrize("name", ["good", "good-fp16", "good-bf16-and-fp64"])
@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_the_factors_kept_for_the_close_are_the_payloads(name: str, chunk: int) -> None:
    """The factors the close takes from a push's kept chunks (rounds/preload.py) are what
    safetensors itself reads from the same bytes, whatever the chunking and the dtypes."""
    from raflora.server.storage.tensorio import factors_in_payload

    data = save(CASES[name])
    check = StreamingUploadCheck(SCHEMA, RANK, "c", SCALE, BOUNDS, len(data))
    chunks = [memoryview(data)[i : i + chunk] for i in range(0, len(data), chunk)]
    for c in chunks:
        check.feed(c)
    layout = check.close()
    got = factors_in_payload(chunks, layout, SCHEMA)
    want = CASES[name]
    for m in MODULES:
        for part, tensor in ((LORA_B, got[m].B), (LORA_A, got[m].A)):
            expected = want[tensor_name(m, part)]
            assert tensor.dtype == expected.dtype and torch.equal(tensor, expected)
    with pytest.raises(InvalidUpdateError, match="do not add up"):
        factors_in_payload(chunks[:-1], layout, SCHEMA)
