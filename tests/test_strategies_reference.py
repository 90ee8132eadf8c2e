"""Every strategy against an independent dense float64 computation of its formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raflora.server.engine import (
    AdapterSchema,
    FactorPair,
    LowRank,
    ScalingRule,
    StrategyConfig,
    SvdMethod,
    Weighting,
    make_strategy,
)

from . import reference as ref
from .conftest import CLIENTS, as_reference, random_updates, rel_err

R = 8


def config(schema: AdapterSchema, **kw: object) -> StrategyConfig:
    return StrategyConfig(schema=schema, max_rank=R, compute_dtype=torch.float64, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("method", [SvdMethod.FACTORED, SvdMethod.DENSE, SvdMethod.AUTO])
@pytest.mark.parametrize("rule", [ScalingRule.STANDARD, ScalingRule.RSLORA])
@pytest.mark.parametrize("uniform", [False, True])
@pytest.mark.parametrize("name", ["raflora", "flexlora"])
def test_spectral_strategies_match_reference(
    schema: AdapterSchema, name: str, method: SvdMethod, rule: ScalingRule, uniform: bool
) -> None:
    weighting = Weighting.UNIFORM if uniform else Weighting.EXAMPLES
    strategy = make_strategy(name, config(schema, svd_method=method, weighting=weighting))
    updates = random_updates(schema, CLIENTS, seed=1, rule=rule)
    state = strategy.aggregate(strategy.initial_state(), updates)
    formula = ref.raflora if name == "raflora" else ref.flexlora
    for m in schema:
        expected = formula(as_reference(updates), m, R, uniform)
        assert rel_err(state.dense(m), expected) < 1e-10
    assert state.round == 1
    assert sorted(state.participant_ranks) == sorted(c[1] for c in CLIENTS)


def test_raflora_and_flexlora_differ_with_mixed_ranks(schema: AdapterSchema) -> None:
    """Guards against a reference that could not tell the two apart."""
    updates = as_reference(random_updates(schema, CLIENTS, seed=2))
    m = next(iter(schema))
    assert rel_err(ref.raflora(updates, m, R), ref.flexlora(updates, m, R)) > 1e-2


def test_raflora_equals_flexlora_with_one_rank(schema: AdapterSchema) -> None:
    specs = [(cid, 4, n, a) for cid, _, n, a in CLIENTS]
    updates = random_updates(schema, specs, seed=3)
    ra = make_strategy("raflora", config(schema)).aggregate(
        make_strategy("raflora", config(schema)).initial_state(), updates
    )
    fl = make_strategy("flexlora", config(schema)).aggregate(
        make_strategy("flexlora", config(schema)).initial_state(), updates
    )
    for m in schema:
        assert rel_err(ra.dense(m), fl.dense(m)) < 1e-12


@pytest.mark.parametrize("norm_weighted", [False, True])
def test_hetlora_matches_reference(schema: AdapterSchema, norm_weighted: bool) -> None:
    strategy = make_strategy("hetlora", config(schema, options={"norm_weighted": norm_weighted}))
    updates = random_updates(schema, CLIENTS, seed=4)
    state = strategy.aggregate(strategy.initial_state(), updates)
    for m in schema:
        expected = ref.hetlora(as_reference(updates), m, R, norm_weighted=norm_weighted)
        assert rel_err(state.dense(m), expected) < 1e-12


def test_rbla_matches_reference_and_keeps_uncovered_slots(schema: AdapterSchema) -> None:
    """Participants reach rank 4 only, so slots 4..7 keep the previous global values."""
    strategy = make_strategy("rbla", config(schema))
    first = random_updates(schema, CLIENTS, seed=5)
    state1 = strategy.aggregate(strategy.initial_state(), first)
    low = [(cid, min(r, 4), n, a) for cid, r, n, a in CLIENTS]
    second = random_updates(schema, low, seed=6)
    state2 = strategy.aggregate(state1, second)
    for m in schema:
        prev = state1.modules[m]
        assert isinstance(prev, FactorPair)
        previous = (prev.B.numpy(), prev.A.numpy())
        expected = ref.rbla(as_reference(second), m, R, previous)
        assert rel_err(state2.dense(m), expected) < 1e-12


def test_flora_is_the_exact_stacked_sum(schema: AdapterSchema) -> None:
    strategy = make_strategy("flora", config(schema))
    updates = random_updates(schema, CLIENTS, seed=7)
    state = strategy.aggregate(strategy.initial_state(), updates)
    for m in schema:
        assert rel_err(state.dense(m), ref.flora(as_reference(updates), m)) < 1e-12
        # Heavy download: the stacked rank is Σ r_i, beyond R.
        assert state.modules[m].rank == sum(c[1] for c in CLIENTS)
    adapter = strategy.distribute(state, 4, 0.5)
    assert adapter.merge is not None
    for m in schema:
        assert rel_err(adapter.merge[m].dense(), ref.flora(as_reference(updates), m)) < 1e-12
        assert torch.count_nonzero(adapter.factors[m].B) == 0  # LoRA restarts from init
    assert strategy.distribute(strategy.initial_state(), 4, 0.5).merge is None


def test_fedit_matches_plain_average(schema: AdapterSchema) -> None:
    specs = [(cid, 4, n, 8.0) for cid, _, n, _ in CLIENTS]
    strategy = make_strategy("fedit", config(schema))
    updates = random_updates(schema, specs, seed=8)
    state = strategy.aggregate(strategy.initial_state(), updates)
    for m in schema:
        assert rel_err(state.dense(m), ref.hetlora(as_reference(updates), m, R)) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", ["raflora", "flexlora", "hetlora", "rbla", "flora"])
def test_low_precision_uploads_aggregate_in_fp32(
    schema: AdapterSchema, name: str, dtype: torch.dtype
) -> None:
    """fp16/bf16 uploads are upcast; the result is fp32 and matches the upcast reference."""
    strategy = make_strategy(name, StrategyConfig(schema=schema, max_rank=R))
    updates = random_updates(schema, CLIENTS, seed=9, dtype=dtype)
    state = strategy.aggregate(strategy.initial_state(), updates)
    clients = as_reference(updates)
    assert max(u.rank for u in updates) == R
    for m in schema:
        d_out, d_in = schema.modules[m].d_out, schema.modules[m].d_in
        module = state.modules[m]
        tensors: tuple[torch.Tensor, ...] = (
            (module.U, module.S, module.V) if isinstance(module, LowRank) else (module.B, module.A)
        )
        assert all(t.dtype == torch.float32 for t in tensors)
        if name == "raflora":
            expected = ref.raflora(clients, m, R)
        elif name == "flexlora":
            expected = ref.flexlora(clients, m, R)
        elif name == "hetlora":
            expected = ref.hetlora(clients, m, R)
        elif name == "rbla":
            # Some client has rank R, so every slot is covered and "previous" is never read.
            unread = (np.full((d_out, R), np.nan), np.full((R, d_in), np.nan))
            expected = ref.rbla(clients, m, R, unread)
        else:
            expected = ref.flora(clients, m)
        assert rel_err(state.dense(m), expected) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not present")
@pytest.mark.parametrize("name", ["raflora", "flexlora"])
def test_cuda_matches_reference(schema: AdapterSchema, name: str) -> None:
    strategy = make_strategy(name, config(schema, device="cuda"))
    updates = random_updates(schema, CLIENTS, seed=10)
    state = strategy.aggregate(strategy.initial_state(), updates)
    formula = ref.raflora if name == "raflora" else ref.flexlora
    for m in schema:
        assert state.modules[m].U.is_cuda  # type: ignore[union-attr]
        assert rel_err(state.dense(m), formula(as_reference(updates), m, R)) < 1e-10
