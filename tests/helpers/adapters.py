"""Deterministic LoRA uploads and the engine's view of them."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from raflora.client_sdk import lora_state_dict, pb
from raflora.server.engine import ClientUpdate, FactorPair, lora_scaling
from raflora.v1.wire import LORA_A, LORA_B, sha256_hex, tensor_name

Shapes = Mapping[str, tuple[int, int]]


def factors(
    rank: int, seed: int, modules: Shapes, *, fan_in_scaled: bool = False
) -> dict[str, torch.Tensor]:
    """A well-formed rank-``rank`` upload for ``{module: (d_out, d_in)}``, in PEFT names.

    Standard-normal A (``rank x d_in``) and B (``d_out x rank``), drawn module by module, A
    before B, from one generator seeded with ``seed``: the same arguments give the same tensors,
    distinct seeds distinct updates. ``fan_in_scaled`` divides A by sqrt(d_in), which keeps
    ``B @ A`` of order one however wide the module is.
    """
    g = torch.Generator().manual_seed(seed)
    pairs = {}
    for m, (d_out, d_in) in modules.items():
        A = torch.randn(rank, d_in, generator=g)
        if fan_in_scaled:
            A = A / d_in**0.5
        pairs[m] = (torch.randn(d_out, rank, generator=g), A)
    tensors: dict[str, torch.Tensor] = lora_state_dict(pairs)
    return tensors


def push_header(
    federation_id: str,
    client_id: str,
    payload: bytes,
    *,
    rank: int,
    num_examples: int,
    round: int = 0,
) -> pb.PushHeader:
    """The header a raw Push stream starts with, announcing ``payload`` (size and SHA-256)."""
    return pb.PushHeader(
        federation_id=federation_id,
        client_id=client_id,
        round=round,
        rank=rank,
        num_examples=num_examples,
        total_bytes=len(payload),
        sha256=sha256_hex(payload),
    )


def engine_update(
    client_id: str,
    rank: int,
    num_examples: int,
    lora_alpha: float,
    tensors: Mapping[str, torch.Tensor],
    modules: Shapes,
) -> ClientUpdate:
    """What the aggregation engine receives for an upload of PEFT-named ``tensors``.

    Feeding these to a strategy directly gives the state the server should publish, the
    reference the service tests compare with.
    """
    return ClientUpdate(
        client_id,
        rank,
        num_examples,
        lora_scaling(lora_alpha, rank),
        {
            m: FactorPair(B=tensors[tensor_name(m, LORA_B)], A=tensors[tensor_name(m, LORA_A)])
            for m in modules
        },
    )
