"""PEFT helpers: load a pulled global adapter into a ``PeftModel`` and push from one.

PEFT is an optional extra (``pip install raflora[peft]``); nothing else in the SDK needs it.
Names, ranks and scalings are checked so that a mismatch fails loudly instead of training a
silently rescaled adapter.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from raflora.v1.wire import LORA_A, LORA_B, tensor_name

from .client import PulledAdapter


class AdapterMismatchError(ValueError):
    """The pulled adapter does not fit the local model; ``field`` names what differs."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def _lora_layers(model: nn.Module, adapter: str) -> dict[str, Any]:
    from peft.tuners.lora import LoraLayer

    layers = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and adapter in module.lora_A
    }
    if not layers:
        raise AdapterMismatchError("model", f"no LoRA layers with adapter {adapter!r}")
    return layers


def adapter_shapes(model: nn.Module, adapter: str = "default") -> dict[str, tuple[int, int]]:
    """``{module: (d_out, d_in)}`` in PEFT's state-dict naming, for a federation's schema."""
    shapes = {}
    for name, layer in _lora_layers(model, adapter).items():
        weight = layer.get_base_layer().weight
        shapes[name] = (int(weight.shape[0]), int(weight.shape[1]))
    return shapes


def adapter_rank_and_scale(model: nn.Module, adapter: str = "default") -> tuple[int, float, float]:
    """(rank, lora_alpha, scaling) shared by every LoRA layer; raises if they differ."""
    seen = {
        (int(layer.r[adapter]), float(layer.lora_alpha[adapter]), float(layer.scaling[adapter]))
        for layer in _lora_layers(model, adapter).values()
    }
    if len(seen) != 1:
        raise AdapterMismatchError(
            "rank", f"LoRA layers disagree on (rank, alpha, scaling): {sorted(seen)}"
        )
    return seen.pop()


@torch.no_grad()
def load_pulled_adapter(model: nn.Module, pulled: PulledAdapter, adapter: str = "default") -> None:
    """Copy the pulled factors into the model's LoRA weights (after FLoRA's merge, if any)."""
    layers = _lora_layers(model, adapter)
    expected = {tensor_name(m, f) for m in layers for f in (LORA_A, LORA_B)}
    got = set(pulled.tensors)
    if missing := sorted(expected - got):
        raise AdapterMismatchError(missing[0], "the pulled adapter lacks this tensor")
    if unknown := sorted(got - expected):
        raise AdapterMismatchError(unknown[0], "the model has no LoRA layer for this tensor")
    rank, alpha, scale = adapter_rank_and_scale(model, adapter)
    if rank != pulled.rank:
        raise AdapterMismatchError(
            "rank", f"the model's LoRA rank is {rank} but the adapter was served at {pulled.rank}"
        )
    if not math.isclose(scale, pulled.scale, rel_tol=1e-6):
        raise AdapterMismatchError(
            "scale",
            f"the model scales LoRA by {scale:g} (alpha {alpha:g}, rank {rank}) but the server "
            f"assumed {pulled.scale:g}; join with the model's lora_alpha",
        )
    for name, layer in layers.items():
        if pulled.merge is not None:
            B = pulled.merge[tensor_name(name, LORA_B, merge=True)]
            A = pulled.merge[tensor_name(name, LORA_A, merge=True)]
            base = layer.get_base_layer().weight
            base += (B.to(torch.float32) @ A.to(torch.float32)).to(base.dtype)
        for factor, module in ((LORA_A, layer.lora_A[adapter]), (LORA_B, layer.lora_B[adapter])):
            source = pulled.tensors[tensor_name(name, factor)]
            if tuple(source.shape) != tuple(module.weight.shape):
                raise AdapterMismatchError(
                    tensor_name(name, factor),
                    f"shape {tuple(source.shape)} != model's {tuple(module.weight.shape)}",
                )
            module.weight.copy_(source.to(module.weight.dtype))


def adapter_state(model: nn.Module, adapter: str = "default") -> dict[str, Tensor]:
    """The model's LoRA factors under the wire's PEFT names, detached on the CPU."""
    out: dict[str, Tensor] = {}
    for name, layer in _lora_layers(model, adapter).items():
        out[tensor_name(name, LORA_A)] = layer.lora_A[adapter].weight.detach().cpu().clone()
        out[tensor_name(name, LORA_B)] = layer.lora_B[adapter].weight.detach().cpu().clone()
    return out
