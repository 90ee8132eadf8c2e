"""A client's view is the best rank-r approximation; init and dead slots stay trainable."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from raflora.server.engine import (
    AdapterSchema,
    FactorSplit,
    GlobalState,
    LowRank,
    ScalingRule,
    Strategy,
    StrategyConfig,
    lora_scaling,
    make_strategy,
    split_lowrank,
)

from .conftest import CLIENTS, random_updates, rel_err

R = 8


def aggregated(
    schema: AdapterSchema, name: str, split: FactorSplit = FactorSplit.ORTHONORMAL_A
) -> tuple[Strategy, GlobalState]:
    cfg = StrategyConfig(schema=schema, max_rank=R, compute_dtype=torch.float64, split=split)
    strategy = make_strategy(name, cfg)
    return strategy, strategy.aggregate(strategy.initial_state(), random_updates(schema, CLIENTS))


@pytest.mark.parametrize("split", list(FactorSplit))
@pytest.mark.parametrize("rule", list(ScalingRule))
@pytest.mark.parametrize("alpha", [1.0, 16.0, 64.0])
@pytest.mark.parametrize("rank", [1, 3, 8])
def test_client_view_is_eckart_young_optimal(
    schema: AdapterSchema, split: FactorSplit, rule: ScalingRule, alpha: float, rank: int
) -> None:
    strategy, state = aggregated(schema, "raflora", split)
    s = lora_scaling(alpha, rank, rule)
    adapter = strategy.distribute(state, rank, s)
    for m in schema:
        D = state.dense(m).numpy()
        U, S, Vt = np.linalg.svd(D)
        best = (U[:, :rank] * S[:rank]) @ Vt[:rank]
        f = adapter.factors[m]
        view = s * (f.B @ f.A).numpy()
        assert f.B.shape == (schema.modules[m].d_out, rank)
        assert f.A.shape == (rank, schema.modules[m].d_in)
        assert rel_err(view, best) < 1e-10
        # Eckart–Young: the residual is exactly the discarded spectrum.
        assert np.linalg.norm(D - view) ** 2 == pytest.approx((S[rank:] ** 2).sum(), rel=1e-8)
        if split is FactorSplit.ORTHONORMAL_A:
            assert np.allclose(f.A @ f.A.T, np.eye(rank), atol=1e-10)
        else:
            assert np.allclose(f.B.norm(dim=0).numpy(), f.A.norm(dim=1).numpy(), rtol=1e-10)


def test_round_zero_is_the_shared_peft_style_init(schema: AdapterSchema) -> None:
    for name in ("raflora", "flexlora", "hetlora", "rbla", "fedit"):
        cfg = StrategyConfig(schema=schema, max_rank=R, seed=123)
        strategy = make_strategy(name, cfg)
        state = strategy.initial_state()
        big = strategy.distribute(state, 8, 0.5)
        small = strategy.distribute(state, 4, 2.0)
        for m, shape in schema.modules.items():
            assert torch.count_nonzero(big.factors[m].B) == 0
            assert torch.equal(small.factors[m].A, big.factors[m].A[:4])
            bound = 1 / np.sqrt(shape.d_in)
            assert float(big.factors[m].A.abs().max()) <= bound
            assert float(big.factors[m].A.abs().max()) > bound / 2  # not a degenerate init
        other = make_strategy(name, StrategyConfig(schema=schema, max_rank=R, seed=124))
        m = next(iter(schema))
        assert not torch.equal(
            other.distribute(other.initial_state(), 8, 0.5).factors[m].A, big.factors[m].A
        )


def test_dead_slots_get_fresh_orthogonal_directions(schema: AdapterSchema) -> None:
    """A state of rank 3 served at rank 8: slots 3..7 have B = 0 and A orthogonal to all."""
    strategy, state = aggregated(schema, "raflora")
    low = {}
    for m, mod in state.modules.items():
        assert isinstance(mod, LowRank)
        low[m] = LowRank(mod.U[:, :3], mod.S[:3], mod.V[:, :3])
    state3 = type(state)(round=state.round, modules=low, participant_ranks=state.participant_ranks)
    big = strategy.distribute(state3, 8, 0.25)
    mid = strategy.distribute(state3, 6, 1.0)
    for m in schema:
        f = big.factors[m]
        assert torch.count_nonzero(f.B[:, 3:]) == 0
        assert bool((f.A.norm(dim=1) > 0).all())
        gram = (f.A @ f.A.T).numpy()
        off = gram - np.diag(np.diag(gram))
        assert np.abs(off).max() < 1e-10
        # The same slot gets the same direction whatever the client's rank.
        assert torch.allclose(mid.factors[m].A, f.A[:6], atol=1e-12)
        assert rel_err(0.25 * f.B @ f.A, low[m].dense()) < 1e-10


def test_factor_level_dead_slots_are_revived(schema: AdapterSchema) -> None:
    """HetLoRA pads with zeros: with participants up to rank 4, slots 4..7 would be dead."""
    strategy = make_strategy("hetlora", StrategyConfig(schema=schema, max_rank=R))
    low = [(cid, min(r, 4), n, a) for cid, r, n, a in CLIENTS]
    state = strategy.aggregate(
        strategy.initial_state(), random_updates(schema, low, dtype=torch.float32)
    )
    adapter = strategy.distribute(state, 8, 1.0)
    for m in schema:
        f = adapter.factors[m]
        assert torch.count_nonzero(f.B[:, 4:]) == 0
        assert bool((f.A[4:].norm(dim=1) > 0).all())
        assert float((f.A[4:] @ f.A[:4].T).abs().max()) < 1e-5
        assert rel_err(f.B @ f.A, state.dense(m)) < 1e-5


def test_distribution_is_deterministic(schema: AdapterSchema) -> None:
    strategy, state = aggregated(schema, "flexlora")
    a, b = strategy.distribute(state, 8, 0.5), strategy.distribute(state, 8, 0.5)
    for m in schema:
        assert torch.equal(a.factors[m].A, b.factors[m].A)
        assert torch.equal(a.factors[m].B, b.factors[m].B)


def test_the_shared_init_is_the_documented_draw(schema: AdapterSchema) -> None:
    """Recomputed from its definition (initialization.py's docstring), not from the code: a
    change of the draw would hand clients that join later another init than earlier ones."""
    seed = 77
    strategy = make_strategy("raflora", StrategyConfig(schema=schema, max_rank=R, seed=seed))
    served = strategy.distribute(strategy.initial_state(), R, 1.0)
    for name, shape in schema.modules.items():
        digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
        u = torch.rand(R, shape.d_in, generator=gen, dtype=torch.float32)
        expected = (u * 2 - 1) * (1.0 / shape.d_in**0.5)
        assert torch.equal(served.factors[name].A.float(), expected)


@pytest.mark.parametrize("split", list(FactorSplit))
def test_a_full_rank_view_draws_no_init_and_shares_no_memory(split: FactorSplit) -> None:
    U, _ = torch.linalg.qr(torch.randn(6, 1, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(5, 1, dtype=torch.float64))
    state = LowRank(U, torch.tensor([2.0], dtype=torch.float64), V)

    def never() -> torch.Tensor:
        raise AssertionError("a view of a full-rank state drew init rows")

    f = split_lowrank(state, 1, 0.5, split, never)
    assert rel_err(0.5 * f.B @ f.A, state.dense()) < 1e-12
    for factor in (f.A, f.B):
        assert factor.is_contiguous()
        assert factor.untyped_storage().data_ptr() not in {
            t.untyped_storage().data_ptr() for t in (state.U, state.S, state.V)
        }
