"""PEFT helpers: loading a pulled adapter into a PeftModel, with checked names, rank and scale."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from raflora.client_sdk import PulledAdapter
from raflora.client_sdk.peft_adapter import (
    AdapterMismatchError,
    adapter_rank_and_scale,
    adapter_shapes,
    adapter_state,
    load_pulled_adapter,
)

peft = pytest.importorskip("peft")


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(12, 10)
        self.value = nn.Linear(12, 6)
        self.other = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.other(self.value(x)) + self.query(x)[:, :3]
        return out


def peft_model(rank: int, alpha: int, rslora: bool = False) -> Any:
    torch.manual_seed(0)
    config = peft.LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=["query", "value"], use_rslora=rslora
    )
    return peft.get_peft_model(Tiny(), config)


def pulled_for(model: nn.Module, seed: int, scale: float, rank: int) -> PulledAdapter:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (d_out, d_in) in adapter_shapes(model).items():
        tensors[f"{name}.lora_A.weight"] = torch.randn(rank, d_in, generator=g)
        tensors[f"{name}.lora_B.weight"] = torch.randn(d_out, rank, generator=g)
    return PulledAdapter(3, rank, scale, tensors, None, None)  # type: ignore[arg-type]


def test_shapes_rank_and_scale_follow_peft() -> None:
    model = peft_model(4, 16)
    assert adapter_shapes(model) == {
        "base_model.model.query": (10, 12),
        "base_model.model.value": (6, 12),
    }
    assert adapter_rank_and_scale(model) == (4, 16.0, 4.0)
    assert adapter_rank_and_scale(peft_model(4, 16, rslora=True))[2] == pytest.approx(8.0)


def test_load_then_state_round_trips_and_changes_the_forward() -> None:
    model = peft_model(4, 8)
    x = torch.randn(5, 12)
    before = model(x)
    pulled = pulled_for(model, 1, 2.0, 4)
    load_pulled_adapter(model, pulled)
    state = adapter_state(model)
    assert set(state) == set(pulled.tensors)
    assert all(torch.equal(state[k], pulled.tensors[k]) for k in state)
    assert not torch.allclose(model(x), before)
    # The adapted layer computes base(x) + s·B·A·x with the pulled factors.
    layer = model.base_model.model.query
    A = pulled.tensors["base_model.model.query.lora_A.weight"]
    B = pulled.tensors["base_model.model.query.lora_B.weight"]
    expected = layer.base_layer(x) + 2.0 * x @ A.T @ B.T
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_flora_merge_goes_into_the_base_weight() -> None:
    model = peft_model(2, 4)
    pulled = pulled_for(model, 2, 2.0, 2)
    g = torch.Generator().manual_seed(5)
    merge = {}
    for name, (d_out, d_in) in adapter_shapes(model).items():
        merge[f"{name}.merge.lora_A.weight"] = torch.randn(3, d_in, generator=g)
        merge[f"{name}.merge.lora_B.weight"] = torch.randn(d_out, 3, generator=g)
    base = model.base_model.model.value.base_layer.weight.detach().clone()
    load_pulled_adapter(model, PulledAdapter(1, 2, 2.0, pulled.tensors, merge, None))  # type: ignore[arg-type]
    delta = (
        merge["base_model.model.value.merge.lora_B.weight"]
        @ merge["base_model.model.value.merge.lora_A.weight"]
    )
    after = model.base_model.model.value.base_layer.weight
    assert torch.allclose(after, base + delta, atol=1e-6)


def test_mismatches_fail_loudly() -> None:
    model = peft_model(4, 8)
    with pytest.raises(AdapterMismatchError) as rank:
        load_pulled_adapter(model, pulled_for(model, 1, 2.0, 8))
    assert rank.value.field in {"rank", "base_model.model.query.lora_A.weight"}
    with pytest.raises(AdapterMismatchError) as scale:
        load_pulled_adapter(model, pulled_for(model, 1, 1.0, 4))
    assert scale.value.field == "scale" and "lora_alpha" in str(scale.value)
    pulled = pulled_for(model, 1, 2.0, 4)
    missing = dict(pulled.tensors)
    missing.pop("base_model.model.value.lora_B.weight")
    with pytest.raises(AdapterMismatchError) as gone:
        load_pulled_adapter(model, PulledAdapter(3, 4, 2.0, missing, None, None))  # type: ignore[arg-type]
    assert gone.value.field == "base_model.model.value.lora_B.weight"
    extra = {**pulled.tensors, "base_model.model.other.lora_A.weight": torch.zeros(4, 6)}
    with pytest.raises(AdapterMismatchError) as unknown:
        load_pulled_adapter(model, PulledAdapter(3, 4, 2.0, extra, None, None))  # type: ignore[arg-type]
    assert unknown.value.field == "base_model.model.other.lora_A.weight"
