"""Folding uploads into running bases (engine/compression.py) against the independent references.

The folded path must publish what the one-shot path publishes: the same ΔW' as the dense
float64 formulas of tests/reference.py, whatever the order the uploads arrive in.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from raflora.server.engine import (
    AdapterSchema,
    ClientUpdate,
    FactorPair,
    LowRank,
    StrategyConfig,
    SvdMethod,
    make_strategy,
)
from raflora.server.engine.compression import (
    CompressedAggregation,
    RoundBases,
    SpanBasis,
    can_fold,
)
from raflora.server.engine.privacy import PrivacyPolicy
from raflora.server.engine.robust import RobustPolicy
from raflora.server.engine.types import GlobalState
from raflora.server.engine.weights import Weighting

from . import reference as ref
from .conftest import CLIENTS, as_reference, random_updates, rel_err

R = 8


def folded_aggregate(
    name: str, schema: AdapterSchema, state: GlobalState, updates: list[ClientUpdate], **kw: object
) -> GlobalState:
    config = StrategyConfig(schema=schema, max_rank=R, compute_dtype=torch.float64, **kw)  # type: ignore[arg-type]
    strategy = make_strategy(name, config)
    bases = RoundBases(schema, state, strategy.dtype, strategy.device)
    folded = [bases.fold(u) for u in updates]
    return CompressedAggregation(strategy, bases, state).aggregate(folded)


@pytest.mark.parametrize("method", [SvdMethod.FACTORED, SvdMethod.DENSE, SvdMethod.AUTO])
@pytest.mark.parametrize("name", ["raflora", "flexlora"])
def test_folded_round_matches_the_reference_formula(
    schema: AdapterSchema, name: str, method: SvdMethod
) -> None:
    updates = random_updates(schema, CLIENTS, seed=3)
    strategy = make_strategy(name, StrategyConfig(schema=schema, max_rank=R))
    state = folded_aggregate(name, schema, strategy.initial_state(), updates, svd_method=method)
    formula = ref.raflora if name == "raflora" else ref.flexlora
    for m in schema:
        assert rel_err(state.dense(m), formula(as_reference(updates), m, R)) < 1e-10
        module = state.modules[m]
        assert isinstance(module, LowRank)
        gram = module.U.T @ module.U  # the lifted factors are still orthonormal
        assert torch.allclose(gram, torch.eye(gram.shape[0], dtype=gram.dtype), atol=1e-10)
    assert state.round == 1


@pytest.mark.parametrize("order", list(itertools.permutations(range(5)))[::17])
def test_arrival_order_does_not_change_the_result(
    schema: AdapterSchema, order: tuple[int, ...]
) -> None:
    updates = random_updates(schema, CLIENTS, seed=5)
    shuffled = [updates[i] for i in order]
    strategy = make_strategy("raflora", StrategyConfig(schema=schema, max_rank=R))
    state = folded_aggregate("raflora", schema, strategy.initial_state(), shuffled)
    for m in schema:
        assert rel_err(state.dense(m), ref.raflora(as_reference(updates), m, R)) < 1e-10


def test_carry_over_keeps_the_previous_components_exactly(schema: AdapterSchema) -> None:
    """raflora_ha's carry-over (design §2.7) reads the previous state through the bases."""
    first = random_updates(schema, CLIENTS, seed=7)
    config = StrategyConfig(
        schema=schema,
        max_rank=R,
        compute_dtype=torch.float64,
        options={"shrinkage": 0.0, "carry_over": True},
    )
    strategy = make_strategy("raflora_ha", config)
    previous = strategy.aggregate(strategy.initial_state(), first)
    low = [c for c in CLIENTS if c[1] <= 4]  # ranks 2 and 4 only: indices 5..8 are carried
    second = random_updates(schema, low, seed=8)
    one_shot = strategy.aggregate(previous, second)
    folded = folded_aggregate(
        "raflora_ha", schema, previous, second, options={"shrinkage": 0.0, "carry_over": True}
    )
    for m in schema:
        prev = previous.modules[m]
        assert isinstance(prev, LowRank)
        expected = ref.raflora_carry_over(
            as_reference(second),
            m,
            R,
            (prev.U.double().numpy(), prev.S.double().numpy(), prev.V.double().numpy().T),
        )
        assert rel_err(folded.dense(m), expected) < 1e-10
        assert rel_err(folded.dense(m), one_shot.dense(m)) < 1e-10


def test_identical_uploads_do_not_grow_the_bases_past_their_span() -> None:
    """64 clients sending one of four fixed adapters span only Σ r of each side, in fp32."""
    schema = AdapterSchema.from_shapes({"m": (256, 192)})
    gen = torch.Generator().manual_seed(11)
    ranks = (4, 8, 16, 32)
    fixed = {
        r: FactorPair(B=torch.randn(256, r, generator=gen), A=torch.randn(r, 192, generator=gen))
        for r in ranks
    }
    updates = [
        ClientUpdate(f"c{i}", ranks[i % 4], 10 + i, 2.0 / ranks[i % 4], {"m": fixed[ranks[i % 4]]})
        for i in range(64)
    ]
    config = StrategyConfig(schema=schema, max_rank=32)
    strategy = make_strategy("raflora", config)
    bases = RoundBases(schema, strategy.initial_state(), torch.float32, torch.device("cpu"))
    folded = [bases.fold(u) for u in updates]
    assert bases.widths()["m"] == (60, 60)
    state = CompressedAggregation(strategy, bases, strategy.initial_state()).aggregate(folded)
    expected = ref.raflora(as_reference(updates), "m", 32)
    assert rel_err(state.dense("m"), expected) < 1e-5


def test_a_basis_stays_orthonormal_and_reproduces_what_it_absorbed() -> None:
    gen = torch.Generator().manual_seed(2)
    basis = SpanBasis(300, torch.float32, torch.device("cpu"))
    blocks = []
    spanned = 0
    for i in range(50):
        X = torch.randn(300, 8, generator=gen)
        new = 8
        if i % 3 == 2 and basis.size:  # blocks half inside the span already
            X[:, :4] = basis.Q @ torch.randn(basis.size, 4, generator=gen, dtype=X.dtype)
            new = 4
        blocks.append(X)
        C = basis.absorb(X)
        spanned = min(300, spanned + new)
        assert basis.size == spanned  # one vector per new direction, never past the dimension
        assert rel_err(basis.Q @ C, X) < 1e-5
    gram = basis.Q.T @ basis.Q
    assert float((gram - torch.eye(300)).abs().max()) < 1e-4
    for X in blocks:  # everything absorbed earlier is still in the final span
        assert rel_err(basis.Q @ (basis.Q.T @ X), X) < 1e-5


def test_zero_uploads_still_give_a_valid_compressed_round(schema: AdapterSchema) -> None:
    """LoRA's B starts at zero: a round of untrained clients has an empty span."""
    updates = [
        ClientUpdate(
            f"c{i}",
            2,
            5,
            1.0,
            {
                m: FactorPair(
                    B=torch.zeros(s.d_out, 2, dtype=torch.float64),
                    A=torch.randn(2, s.d_in, dtype=torch.float64),
                )
                for m, s in schema.modules.items()
            },
        )
        for i in range(3)
    ]
    strategy = make_strategy("raflora", StrategyConfig(schema=schema, max_rank=R))
    state = folded_aggregate("raflora", schema, strategy.initial_state(), updates)
    for m in schema:
        assert float(state.dense(m).abs().max()) == 0.0
        assert state.dense(m).shape == (schema.modules[m].d_out, schema.modules[m].d_in)


def test_only_strategies_that_see_each_upload_alone_fold(schema: AdapterSchema) -> None:
    def strategy(name: str, **kw: object) -> object:
        return make_strategy(name, StrategyConfig(schema=schema, max_rank=R, **kw))  # type: ignore[arg-type]

    assert can_fold(strategy("raflora"))  # type: ignore[arg-type]
    assert can_fold(strategy("raflora_ha"))  # type: ignore[arg-type]
    assert not can_fold(strategy("hetlora"))  # type: ignore[arg-type]
    assert not can_fold(strategy("flora"))  # type: ignore[arg-type]
    robust = RobustPolicy(clip_norm=1.0)
    assert not can_fold(strategy("raflora", robust=robust))  # type: ignore[arg-type]
    private = PrivacyPolicy(noise_multiplier=1.0, clip_norm=1.0)
    assert not can_fold(strategy("raflora", privacy=private, weighting=Weighting.UNIFORM))  # type: ignore[arg-type]


@pytest.mark.parametrize("batches", [(5,), (2, 3), (1, 1, 3)])
def test_uploads_folded_together_give_the_same_round(
    schema: AdapterSchema, batches: tuple[int, ...]
) -> None:
    """The service folds whatever arrived while its executor was busy as one block."""
    updates = random_updates(schema, CLIENTS, seed=9)
    config = StrategyConfig(schema=schema, max_rank=R, compute_dtype=torch.float64)
    strategy = make_strategy("raflora", config)
    state = strategy.initial_state()
    bases = RoundBases(schema, state, strategy.dtype, strategy.device)
    folded: list[ClientUpdate] = []
    start = 0
    for size in batches:
        folded += bases.fold_many(updates[start : start + size])
        start += size
    result = CompressedAggregation(strategy, bases, state).aggregate(folded)
    for m in schema:
        assert rel_err(result.dense(m), ref.raflora(as_reference(updates), m, R)) < 1e-10


def test_one_huge_upload_cannot_erase_the_directions_of_the_others() -> None:
    """A client rescales its factors (B·1e7, A·1e-7: the same product, so every bound holds).
    Folded in one block with honest uploads, in fp32, their directions must survive: the
    new-direction floor is per column, not relative to the whole block."""
    schema = AdapterSchema.from_shapes({"m": (128, 96)})
    gen = torch.Generator().manual_seed(4)

    def upload(cid: str, scale: float) -> ClientUpdate:
        B = torch.randn(128, 4, generator=gen) * scale
        A = torch.randn(4, 96, generator=gen) / scale
        return ClientUpdate(cid, 4, 10, 0.5, {"m": FactorPair(B=B, A=A)})

    updates = [upload("hostile", 1e7), upload("a", 1.0), upload("b", 1.0), upload("c", 1.0)]
    strategy = make_strategy("raflora", StrategyConfig(schema=schema, max_rank=16))
    state = strategy.initial_state()
    bases = RoundBases(schema, state, torch.float32, torch.device("cpu"))
    folded = bases.fold_many(updates)
    assert bases.widths()["m"] == (16, 16)
    result = CompressedAggregation(strategy, bases, state).aggregate(folded)
    assert rel_err(result.dense("m"), ref.raflora(as_reference(updates), "m", 16)) < 1e-4
