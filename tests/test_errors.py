"""Bad input raises a typed error whose field names the problem, and changes nothing."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from raflora.server.engine import (
    AdapterSchema,
    AggregationError,
    ClientUpdate,
    ConfigError,
    DtypeError,
    EmptyRoundError,
    GlobalState,
    InvalidUpdateError,
    MissingModuleError,
    NonFiniteError,
    RankError,
    ShapeMismatchError,
    Strategy,
    StrategyConfig,
    UnknownModuleError,
    UnknownStrategyError,
    ZeroWeightError,
    make_strategy,
)

from .conftest import CLIENTS, random_updates

Q, V = "layers.0.q_proj", "layers.0.v_proj"


Setup = tuple[Strategy, GlobalState, list[ClientUpdate]]


@pytest.fixture
def setup(schema: AdapterSchema) -> Setup:
    strategy = make_strategy("raflora", StrategyConfig(schema=schema, max_rank=8))
    return strategy, strategy.initial_state(), random_updates(schema, CLIENTS, dtype=torch.float32)


def with_factor(update: ClientUpdate, module: str, **tensors: torch.Tensor) -> ClientUpdate:
    factors = dict(update.factors)
    factors[module] = replace(factors[module], **tensors)
    return replace(update, factors=factors)


def expect(
    setup: Setup, bad_index: int, bad: ClientUpdate, error: type[AggregationError], field: str
) -> AggregationError:
    strategy, state, updates = setup
    updates = list(updates)
    updates[bad_index] = bad
    with pytest.raises(error) as info:
        strategy.aggregate(state, updates)
    assert info.value.field == field
    assert field in str(info.value)
    assert isinstance(info.value, AggregationError) and isinstance(info.value, ValueError)
    return info.value


def test_a_shape_mismatch(setup: Setup) -> None:
    u = setup[2][0]
    bad = with_factor(u, Q, A=torch.zeros(u.rank, 99))
    err = expect(setup, 0, bad, ShapeMismatchError, f"{Q}.lora_A.weight")
    assert "99" in str(err)


def test_b_rank_disagrees_with_declared_rank(setup: Setup) -> None:
    u = setup[2][1]
    bad = with_factor(u, V, B=torch.zeros(14, u.rank + 1))
    expect(setup, 1, bad, ShapeMismatchError, f"{V}.lora_B.weight")


def test_rank_above_max(setup: Setup) -> None:
    u = setup[2][0]
    err = expect(setup, 0, replace(u, rank=9), RankError, "rank")
    assert "max rank" in str(err)


def test_rank_not_allowed(schema: AdapterSchema) -> None:
    strategy = make_strategy(
        "raflora", StrategyConfig(schema=schema, max_rank=8, allowed_ranks={2, 8})
    )
    updates = random_updates(schema, CLIENTS, dtype=torch.float32)
    with pytest.raises(RankError, match="allowed ranks"):
        strategy.aggregate(strategy.initial_state(), updates)
    with pytest.raises(RankError):
        strategy.distribute(strategy.initial_state(), 4, 1.0)


def test_missing_and_unknown_modules(setup: Setup) -> None:
    u = setup[2][0]
    expect(setup, 0, replace(u, factors={Q: u.factors[Q]}), MissingModuleError, V)
    extra = dict(u.factors)
    extra["layers.9.k_proj"] = u.factors[Q]
    expect(setup, 0, replace(u, factors=extra), UnknownModuleError, "layers.9.k_proj")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite(setup: Setup, value: float) -> None:
    u = setup[2][2]
    B = u.factors[Q].B.clone()
    B[3, 1] = value
    expect(setup, 2, with_factor(u, Q, B=B), NonFiniteError, f"{Q}.lora_B.weight")


def test_integer_dtype(setup: Setup) -> None:
    u = setup[2][0]
    A = u.factors[Q].A.to(torch.int32)
    expect(setup, 0, with_factor(u, Q, A=A), DtypeError, f"{Q}.lora_A.weight")


def test_bad_metadata(setup: Setup) -> None:
    u = setup[2][0]
    expect(setup, 0, replace(u, num_examples=-1), InvalidUpdateError, "num_examples")
    expect(setup, 0, replace(u, scale=0.0), InvalidUpdateError, "scale")
    expect(setup, 0, replace(u, scale=float("nan")), InvalidUpdateError, "scale")
    expect(setup, 1, replace(setup[2][1], client_id=u.client_id), InvalidUpdateError, "client_id")


def test_empty_round(setup: Setup) -> None:
    strategy, state, _ = setup
    with pytest.raises(EmptyRoundError) as info:
        strategy.aggregate(state, [])
    assert info.value.field == "updates"


def test_zero_total_weight(setup: Setup) -> None:
    strategy, state, updates = setup
    with pytest.raises(ZeroWeightError, match="num_examples"):
        strategy.aggregate(state, [replace(u, num_examples=0) for u in updates])


def test_unknown_strategy_and_options(schema: AdapterSchema) -> None:
    cfg = StrategyConfig(schema=schema, max_rank=8)
    with pytest.raises(UnknownStrategyError, match="raflora") as info:
        make_strategy("fedavg++", cfg)
    assert info.value.field == "strategy"
    with pytest.raises(ConfigError, match="norm_weighted"):
        make_strategy("raflora", replace(cfg, options={"norm_weighted": True}))


def test_bad_configs(schema: AdapterSchema) -> None:
    with pytest.raises(ConfigError, match="max_rank"):
        StrategyConfig(schema=schema, max_rank=0)
    with pytest.raises(ConfigError, match="compute_dtype"):
        StrategyConfig(schema=schema, max_rank=4, compute_dtype=torch.float16)
    with pytest.raises(ConfigError, match="allowed_ranks"):
        StrategyConfig(schema=schema, max_rank=4, allowed_ranks={2, 8})
    with pytest.raises(ConfigError, match="schema"):
        AdapterSchema.from_shapes({})


def test_fedit_refuses_mixed_ranks(schema: AdapterSchema) -> None:
    strategy = make_strategy("fedit", StrategyConfig(schema=schema, max_rank=8))
    with pytest.raises(RankError, match="one rank"):
        strategy.aggregate(strategy.initial_state(), random_updates(schema, CLIENTS))


def test_failed_aggregate_leaves_state_and_inputs_untouched(setup: Setup) -> None:
    strategy, state, updates = setup
    good = strategy.aggregate(state, updates)
    snapshot = [{m: (f.B.clone(), f.A.clone()) for m, f in u.factors.items()} for u in updates]
    bad = list(updates)
    B = bad[-1].factors[V].B.clone()
    B[0, 0] = float("nan")
    bad[-1] = with_factor(bad[-1], V, B=B)
    with pytest.raises(NonFiniteError):
        strategy.aggregate(good, bad)
    for u, snap in zip(updates, snapshot, strict=True):
        for m, f in u.factors.items():
            assert torch.equal(f.B, snap[m][0]) and torch.equal(f.A, snap[m][1])
    again = strategy.aggregate(state, updates)
    for m in good.modules:
        assert torch.allclose(again.dense(m), good.dense(m))
