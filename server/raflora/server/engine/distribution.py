"""Turning the global state into one client's factors at its own rank and scaling."""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

import torch
from torch import Tensor

from .initialization import orthogonal_fresh_rows
from .types import FactorPair, LowRank


class FactorSplit(str, Enum):
    """How ``U diag(σ) Vᵀ`` is split into ``B`` and ``A`` (both give the same ``s·B·A``)."""

    ORTHONORMAL_A = "flexlora"  # B = U diag(σ)/s, A = Vᵀ  (FlexLoRA's published split)
    BALANCED = "balanced"  # B = U diag(√(σ/s)), A = diag(√(σ/s)) Vᵀ


def live_slot_count(S: Tensor, d_out: int, d_in: int) -> int:
    """Slots whose singular value is numerically non-zero (matrix_rank's tolerance)."""
    if S.numel() == 0:
        return 0
    top = float(S.max())
    if top <= 0:
        return 0
    tol = max(d_out, d_in) * torch.finfo(S.dtype).eps * top
    return int((tol < S).sum())


def split_lowrank(
    state: LowRank,
    rank: int,
    scale: float,
    split: FactorSplit,
    init_rows: Tensor | Callable[[], Tensor],
) -> FactorPair:
    """Best rank-``rank`` approximation of the state as LoRA factors with ``scale·B·A`` = it.

    Slots beyond the state's numerical rank get B = 0 and a fresh direction in A (orthogonal
    to the others) so they stay trainable. ``init_rows`` holds at least ``rank`` init rows, or
    makes them: then only when a slot is dead (a view of a full-rank state draws none).
    """
    d_out, d_in = int(state.U.shape[0]), int(state.V.shape[0])
    n_live = min(rank, live_slot_count(state.S, d_out, d_in))
    U, S, V = state.U[:, :n_live], state.S[:n_live], state.V[:, :n_live]
    if split is FactorSplit.BALANCED:
        root = torch.sqrt(S / scale)
        B_live, A_live = U * root, root[:, None] * V.T
    else:
        # A copy, never a view of the state's V (a caller may write into the factors).
        B_live, A_live = U * (S / scale), V.T.clone(memory_format=torch.contiguous_format)
    if n_live == rank:  # every slot live: no fresh rows, nothing to join
        return FactorPair(B=B_live.contiguous(), A=A_live.contiguous())
    rows = init_rows() if callable(init_rows) else init_rows
    fresh = orthogonal_fresh_rows(A_live, rows[n_live:rank].to(A_live.dtype))
    if n_live == 0:  # round 0, or a state of zeros: the init itself, B = 0
        return FactorPair(B=B_live.new_zeros(d_out, rank), A=fresh.contiguous())
    B = torch.cat([B_live, B_live.new_zeros(d_out, rank - n_live)], dim=1)
    A = torch.cat([A_live, fresh], dim=0)
    return FactorPair(B=B.contiguous(), A=A.contiguous())


def truncate_factors(state: FactorPair, rank: int, scale: float, init_rows: Tensor) -> FactorPair:
    """Factor-level strategies: the first ``rank`` slots, scaling divided out of ``B``.

    A slot that nobody trains (A row and B column both zero) is revived like a dead SVD slot.
    """
    B = state.B[:, :rank] / scale
    A = state.A[:rank].clone()
    dead = (A.abs().sum(dim=1) == 0) & (B.abs().sum(dim=0) == 0)
    if bool(dead.any()):
        live_idx = torch.nonzero(~dead).flatten()
        dead_idx = torch.nonzero(dead).flatten()
        A[dead_idx] = orthogonal_fresh_rows(A[live_idx], init_rows[dead_idx].to(A.dtype))
    return FactorPair(B=B.contiguous(), A=A.contiguous())
