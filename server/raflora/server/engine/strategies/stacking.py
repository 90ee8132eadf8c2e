"""FLoRA: the exact weighted sum by stacking every client's factors.

The round's delta ``Σ_i p_i s_i B_i A_i`` is kept exactly as stacked factors (rank Σ r_i, the
heavy download). Each client merges it into its frozen base weights and restarts LoRA from a
fresh shared init, so it assumes, as the FLoRA paper does, that clients merge every round.
"""

from __future__ import annotations

import torch

from ..types import FactorPair, GlobalState
from .base import PreparedRound, Strategy


class FLoRA(Strategy):
    name = "flora"

    def initial_state(self) -> GlobalState:
        modules = {
            name: FactorPair(
                B=self.compute_scalar(0).new_zeros(shape.d_out, 0),
                A=self.compute_scalar(0).new_zeros(0, shape.d_in),
            )
            for name, shape in self.schema.modules.items()
        }
        return GlobalState(round=0, modules=modules)

    def merge_rank(self, state: GlobalState, name: str) -> int | None:
        return state.modules[name].rank if state.round > 0 else None

    def distribute_module(
        self, state: GlobalState, name: str, rank: int, scale: float
    ) -> tuple[FactorPair, FactorPair | None]:
        module = state.modules[name]
        assert isinstance(module, FactorPair)
        fresh = FactorPair(
            B=self.compute_scalar(0).new_zeros(self.schema.modules[name].d_out, rank),
            A=self.init_rows(name, rank, f"#round{state.round}"),  # FLoRA re-inits every round
        )
        return fresh, (module if state.round > 0 else None)

    def _aggregate_module(self, name: str, state: GlobalState, round_: PreparedRound) -> FactorPair:
        p = round_.p.to(dtype=self.dtype, device=self.device)
        B = torch.cat(
            [u.factors[name].B * (p[i] * u.scale) for i, u in enumerate(round_.updates)], dim=1
        )
        A = torch.cat([u.factors[name].A for u in round_.updates], dim=0)
        return FactorPair(B=B, A=A)
