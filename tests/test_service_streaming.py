"""A 200 MB adapter streams up and down in bounded chunks.

The server runs as its own process so that its memory can be sampled from outside:
``RssAnon`` in ``/proc/<pid>/status`` counts anonymous memory only, so the page cache of the
upload and view files the server writes, reads or maps (file-backed) is not counted as
"holding" the payload, while every bytes object, tensor and gRPC buffer is.

Bounds, and why:

* push: the server writes each 1 MiB chunk to disk as it arrives, then validates the stored
  file one module (one A/B pair, 4 MiB here) at a time. Allowed growth: 64 MiB, i.e. a small
  multiple of the chunk plus one module under validation plus gRPC/HTTP2 receive buffers
  (its flow-control window) and one-time allocator/thread-pool warm-up. Holding the payload
  would cost >= 192 MiB.
* pull: the view is built module by module into a file, then read back and sent 1 MiB at a
  time. Same 64 MiB allowance: one module's factors being computed plus the send queue.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import pytest
import torch
from safetensors.torch import load_file

from raflora.client_sdk import AdminClient, RafloraClient, lora_state_dict
from raflora.server.engine.initialization import shared_init_rows
from raflora.server.testing import ServerProcess

from .helpers.federations import spec

pytestmark = pytest.mark.slow

MiB = 1 << 20
FEDERATION = "stream"
RANK = 64
D = 8192
# 48 modules of 8192 x 8192 at rank 64: each factor is 64 x 8192 fp32 = 2 MiB, a module 4 MiB,
# the upload 192 MiB (~201 MB) in 192 chunks of 1 MiB.
MODULES = {f"layers.{i}.proj": (D, D) for i in range(48)}
PAYLOAD_BYTES = len(MODULES) * 2 * RANK * D * 4
CHUNK = MiB
PUSH_GROWTH_BOUND = 64 * MiB
PULL_GROWTH_BOUND = 64 * MiB


def rss_anon(pid: int) -> int:
    """Anonymous resident memory of ``pid`` in bytes (``RssAnon`` in /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no RssAnon for pid {pid}")


class RssSampler:
    """Samples a process's RssAnon every ``interval`` seconds; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        self.pid = pid
        self.interval = interval
        self.baseline = rss_anon(pid)
        self.peak = self.baseline
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon(self.pid))
            self.samples += 1
            self._stop.wait(self.interval)

    @property
    def growth(self) -> int:
        return self.peak - self.baseline

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(5)
        self.peak = max(self.peak, rss_anon(self.pid))


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    with ServerProcess(tmp_path / "data", tmp_path / "server.log") as handle:
        yield handle


def steps(progress: list[int]) -> list[int]:
    """Bytes per message, from the cumulative counts a progress callback saw."""
    return [b - a for a, b in zip([0, *progress], progress, strict=False)]


def big_adapter(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return lora_state_dict(
        {
            name: (
                torch.randn(d_out, RANK, generator=gen),
                torch.randn(RANK, d_in, generator=gen),
            )
            for name, (d_out, d_in) in MODULES.items()
        }
    )


def test_200mb_adapter_streams_in_bounded_server_memory(
    server: ServerProcess, tmp_path: Path
) -> None:
    with AdminClient(server.target) as admin:
        # min_clients=2: one upload must not start an aggregation while memory is sampled.
        admin.create_federation(spec(FEDERATION, MODULES, max_rank=RANK, min_clients=2))
    pid = server.process.pid
    with RafloraClient(server.target, FEDERATION, "big", chunk_size=CHUNK) as client:
        info = client.join(RANK, num_examples=10)
        assert info.chunk_size == CHUNK
        adapter = big_adapter(seed=7)

        push_calls: list[int] = []
        started = time.perf_counter()
        with RssSampler(pid) as push_mem:
            result = client.push(
                adapter,
                round=0,
                num_examples=10,
                progress=lambda done, total: push_calls.append(done),
            )
        push_seconds = time.perf_counter() - started
        assert not result.duplicate
        assert result.uploads_in_round == 1
        assert result.received_bytes > PAYLOAD_BYTES
        assert len(push_calls) >= 190
        assert push_calls[-1] == result.received_bytes
        assert max(steps(push_calls)) <= CHUNK
        uploads = tmp_path / "data" / "federations" / FEDERATION / "uploads" / "00000000"
        record = json.loads((uploads / "big.json").read_text())
        assert record["size"] == result.received_bytes
        digest = hashlib.sha256((uploads / "big.safetensors").read_bytes()).hexdigest()
        assert digest == record["sha256"]  # the stored bytes are the ones the client hashed
        del adapter

        pull_calls: list[int] = []
        started = time.perf_counter()
        with RssSampler(pid) as pull_mem:
            pulled = client.pull(progress=lambda done, total: pull_calls.append(done))
        pull_seconds = time.perf_counter() - started

    print(
        f"\npayload {result.received_bytes / MiB:.1f} MiB; server RssAnon baseline "
        f"{push_mem.baseline / MiB:.1f} MiB, push growth {push_mem.growth / MiB:.1f} MiB "
        f"({push_mem.samples} samples, {push_seconds:.1f}s), pull baseline "
        f"{pull_mem.baseline / MiB:.1f} MiB, pull growth {pull_mem.growth / MiB:.1f} MiB "
        f"({pull_mem.samples} samples, {pull_seconds:.1f}s)"
    )
    assert push_mem.samples > 10 and pull_mem.samples > 10
    assert push_mem.growth <= PUSH_GROWTH_BOUND, f"push grew RssAnon by {push_mem.growth} B"
    assert pull_mem.growth <= PULL_GROWTH_BOUND, f"pull grew RssAnon by {pull_mem.growth} B"

    # The download: rank-64 factors for every module, in >= 190 bounded chunks, and exactly
    # the view file the server built (the SDK already checked it against the header sha256).
    assert (pulled.round, pulled.rank) == (0, RANK)
    assert len(pull_calls) >= 190
    assert max(steps(pull_calls)) <= CHUNK
    assert pulled.merge is None
    assert len(pulled.tensors) == 2 * len(MODULES)
    for name, (d_out, d_in) in MODULES.items():
        assert pulled.tensors[f"{name}.lora_A.weight"].shape == (RANK, d_in)
        assert pulled.tensors[f"{name}.lora_B.weight"].shape == (d_out, RANK)
    views = list(
        (tmp_path / "data" / "federations" / FEDERATION / "views" / "00000000").glob(
            "*.safetensors"
        )
    )
    assert len(views) == 1
    assert pull_calls[-1] == views[0].stat().st_size
    on_disk = load_file(str(views[0]))
    assert on_disk.keys() == pulled.tensors.keys()
    for key, tensor in on_disk.items():
        assert torch.equal(tensor, pulled.tensors[key]), key
    # Round 0 is ΔW = 0: B is zero and A is the federation's shared seeded init.
    first = next(iter(MODULES))
    assert not pulled.tensors[f"{first}.lora_B.weight"].any()
    assert torch.equal(
        pulled.tensors[f"{first}.lora_A.weight"], shared_init_rows(first, D, RANK, 0)
    )
