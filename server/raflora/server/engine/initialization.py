"""The shared seeded LoRA init and the revival of dead rank slots.

Every client must start in the same subspace, so ``lora_A``'s init is a pure function of
(seed, module name): PEFT's kaiming-uniform(a=√5), i.e. U(-1/√d_in, 1/√d_in), drawn on the CPU
in fp32 so that it is identical whatever device the server aggregates on.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor


def _module_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def shared_init_rows(
    name: str,
    d_in: int,
    rows: int,
    seed: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Tensor:
    """The first ``rows`` rows of the federation's shared ``lora_A`` init for ``name``."""
    gen = torch.Generator(device="cpu").manual_seed(_module_seed(seed, name))
    bound = 1.0 / d_in**0.5
    init = torch.rand(rows, d_in, generator=gen, dtype=torch.float32)
    # (x·2 − 1)·bound in place: the same values as out of place, without two temporaries.
    init.mul_(2).sub_(1).mul_(bound)
    return init.to(dtype=dtype, device=device)


def orthogonal_fresh_rows(live: Tensor, init_rows: Tensor) -> Tensor:
    """Fresh ``lora_A`` rows for dead slots: orthogonal to ``live`` and to each other.

    With no live rows this is the init itself (round 0, PEFT-style). Otherwise each init row is
    Gram–Schmidt-orthogonalised, in order, against the live rows and the fresh rows before it,
    and keeps its init norm, so a slot's direction does not depend on the client's rank.
    Where d_in leaves no room for another orthogonal direction, the raw init row is used.
    """
    n_dead = int(init_rows.shape[0])
    if n_dead == 0 or live.shape[0] == 0:
        return init_rows.clone()
    n_live = int(live.shape[0])
    X = torch.cat([live, init_rows], dim=0).T  # d_in × (n_live + n_dead)
    Q, R = torch.linalg.qr(X)
    n_basis = int(Q.shape[1])
    signs = torch.sign(torch.diagonal(R))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    Q = Q * signs[:n_basis]
    fresh = init_rows.clone()
    usable = max(0, min(n_dead, n_basis - n_live))
    if usable:
        norms = init_rows[:usable].norm(dim=1, keepdim=True)
        fresh[:usable] = Q[:, n_live : n_live + usable].T * norms
    return fresh
