"""Factor-level baselines: HetLoRA zero-padding, RBLA and FedIT.

These average ``A`` and ``B`` separately, so the product of averages is what clients get.
Clients' scalings differ, so ``B`` is always averaged as the effective ``s_i · B_i``; the
global state stores that effective ``B`` and each client divides its own ``s`` back out.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..distribution import truncate_factors
from ..errors import RankError
from ..lowrank import frobenius_norm_of_product
from ..types import FactorPair, GlobalState
from .base import PreparedRound, Strategy


class FactorLevelStrategy(Strategy):
    def initial_state(self) -> GlobalState:
        R = self.config.max_rank
        modules = {
            name: FactorPair(
                B=self.compute_scalar(0).new_zeros(shape.d_out, R), A=self.init_rows(name, R)
            )
            for name, shape in self.schema.modules.items()
        }
        return GlobalState(round=0, modules=modules)

    def distribute_module(
        self, state: GlobalState, name: str, rank: int, scale: float
    ) -> tuple[FactorPair, FactorPair | None]:
        module = state.modules[name]
        assert isinstance(module, FactorPair)
        return truncate_factors(module, rank, scale, self.init_rows(name, rank)), None

    def padded(self, round_: PreparedRound, name: str) -> tuple[Tensor, Tensor]:
        """Every client's (effective B, A) zero-padded to R: shapes n×d_out×R and n×R×d_in."""
        shape, R = self.schema.modules[name], self.config.max_rank
        n = len(round_.updates)
        B = self.compute_scalar(0).new_zeros(n, shape.d_out, R)
        A = self.compute_scalar(0).new_zeros(n, R, shape.d_in)
        for i, u in enumerate(round_.updates):
            f = u.factors[name]
            B[i, :, : u.rank] = f.B * u.scale
            A[i, : u.rank] = f.A
        return B, A


class HetLoRA(FactorLevelStrategy):
    """Zero-pad to R and average each factor; ``norm_weighted`` weighs by p_i·‖s_i B_i A_i‖_F."""

    name = "hetlora"
    known_options = frozenset({"norm_weighted"})

    def _aggregate_module(self, name: str, state: GlobalState, round_: PreparedRound) -> FactorPair:
        B, A = self.padded(round_, name)
        w = round_.p.to(dtype=self.dtype, device=self.device)
        if self.config.options.get("norm_weighted", False):
            norms = torch.stack([frobenius_norm_of_product(B[i], A[i]) for i in range(len(w))])
            scored = w * norms
            if float(scored.sum()) > 0:  # all-zero updates (e.g. untrained B) keep p_i
                w = scored / scored.sum()
        return FactorPair(B=torch.einsum("i,ioj->oj", w, B), A=torch.einsum("i,ijd->jd", w, A))


class FedIT(HetLoRA):
    """FedAvg of A and B for homogeneous ranks; refuses mixed ranks."""

    name = "fedit"
    known_options = frozenset()

    def _aggregate_module(self, name: str, state: GlobalState, round_: PreparedRound) -> FactorPair:
        if len(set(round_.ranks)) > 1:
            raise RankError(
                "rank", f"fedit needs one rank for all clients, got {set(round_.ranks)}"
            )
        return super()._aggregate_module(name, state, round_)


class RBLA(FactorLevelStrategy):
    """Pad, then average row/column j over only the clients whose rank covers j.

    A slot no participant covers keeps the previous global value instead of decaying to zero.
    """

    name = "rbla"

    def _aggregate_module(self, name: str, state: GlobalState, round_: PreparedRound) -> FactorPair:
        B, A = self.padded(round_, name)
        R = self.config.max_rank
        ranks = torch.tensor(round_.ranks, device=self.device)
        covers = (ranks[:, None] > torch.arange(R, device=self.device)[None, :]).to(self.dtype)
        w = round_.p.to(dtype=self.dtype, device=self.device)[:, None] * covers  # n × R
        total = w.sum(dim=0)
        covered = total > 0
        w = w / torch.where(covered, total, torch.ones_like(total))
        B_new = torch.einsum("ij,ioj->oj", w, B)
        A_new = torch.einsum("ij,ijd->jd", w, A)
        previous = state.modules[name]
        assert isinstance(previous, FactorPair)
        B_new[:, ~covered] = previous.B[:, ~covered].to(B_new)
        A_new[~covered] = previous.A[~covered].to(A_new)
        return FactorPair(B=B_new, A=A_new)
