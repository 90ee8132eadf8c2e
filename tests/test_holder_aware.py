"""Holder-aware partition weighting: independent formulas and exact reductions (γ=0, γ=1)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raflora.server.engine import AdapterSchema, ConfigError, StrategyConfig, make_strategy
from raflora.server.engine.weights import holder_aware_index_weights

from .conftest import CLIENTS, random_updates, rel_err


def reference_weights(
    ranks: list[int], n: list[float], gamma: float, shrinkage: float, max_boost: float
) -> list[np.ndarray]:
    """Straight from the definitions, one index at a time."""
    p = np.array(n, dtype=float) / sum(n)
    out = [np.zeros(r) for r in ranks]
    for j in range(1, max(ranks) + 1):
        holders = [i for i, r in enumerate(ranks) if r >= j]
        W = sum(p[i] for i in holders)
        if W == 0:
            continue
        m = W**-gamma
        if shrinkage > 0:
            ess = W**2 / sum(p[i] ** 2 for i in holders)
            lam = ess / (ess + shrinkage)
            m = lam * m + (1 - lam)
        m = min(m, max_boost)
        for i in holders:
            out[i][j - 1] = p[i] * m
    return out


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 8), st.integers(1, 100)), min_size=1, max_size=7),
    st.floats(0.0, 2.0),
    st.sampled_from([0.0, 0.5, 2.0, 10.0]),
    st.sampled_from([1.0, 1.5, 4.0, math.inf]),
)
def test_weights_match_the_definition(
    clients: list[tuple[int, int]], gamma: float, shrinkage: float, max_boost: float
) -> None:
    ranks = [r for r, _ in clients]
    n = [float(k) for _, k in clients]
    p = torch.tensor(n, dtype=torch.float64) / sum(n)
    got = holder_aware_index_weights(
        ranks, p, gamma=gamma, shrinkage=shrinkage, max_boost=max_boost
    )
    want = reference_weights(ranks, n, gamma, shrinkage, max_boost)
    for g, w in zip(got, want, strict=True):
        assert np.allclose(g.numpy(), w, rtol=1e-12, atol=1e-15)


def test_fewer_holders_shrink_toward_flexlora() -> None:
    """With κ > 0 a partition held by one small client is boosted less than by raFLoRA."""
    ranks, n = [2, 2, 2, 8], [40.0, 40.0, 40.0, 10.0]
    p = torch.tensor(n, dtype=torch.float64) / sum(n)
    ra = holder_aware_index_weights(ranks, p)
    shrunk = holder_aware_index_weights(ranks, p, shrinkage=2.0)
    assert float(ra[3][5]) == pytest.approx(1.0)  # raFLoRA: the lone holder gets full weight
    assert float(p[3]) < float(shrunk[3][5]) < float(ra[3][5])
    capped = holder_aware_index_weights(ranks, p, max_boost=2.0)
    assert float(capped[3][5]) == pytest.approx(2 * float(p[3]))


@pytest.mark.parametrize(
    ("options", "equivalent"),
    [
        ({"shrinkage": 0.0}, "raflora"),
        ({"gamma": 1.0, "shrinkage": 0.0}, "raflora"),
        ({"gamma": 0.0}, "flexlora"),
        ({"gamma": 0.0, "shrinkage": 5.0, "max_boost": 3.0}, "flexlora"),
        ({"max_boost": 1.0}, "flexlora"),
    ],
)
def test_reduces_exactly(schema: AdapterSchema, options: dict[str, float], equivalent: str) -> None:
    updates = random_updates(schema, CLIENTS, seed=31)

    def run(name: str, opts: dict[str, float]) -> dict[str, torch.Tensor]:
        cfg = StrategyConfig(schema=schema, max_rank=8, compute_dtype=torch.float64, options=opts)
        strategy = make_strategy(name, cfg)
        state = strategy.aggregate(strategy.initial_state(), updates)
        return {m: state.dense(m) for m in schema}

    ours, theirs = run("raflora_ha", options), run(equivalent, {})
    for m in schema:
        assert rel_err(ours[m], theirs[m]) < 1e-12


@pytest.mark.parametrize("gamma", [0.25, 0.5, 0.75])
def test_pass_through_scales_partitions_by_w_to_one_minus_gamma(
    schema: AdapterSchema, gamma: float
) -> None:
    """Extends docs/design.md §2.5: a pass-through round multiplies partition k by W_k^(1-γ)."""
    from raflora.server.engine import ClientUpdate, LowRank, lora_scaling

    cfg = StrategyConfig(
        schema=schema,
        max_rank=8,
        compute_dtype=torch.float64,
        options={"gamma": gamma, "shrinkage": 0.0},
    )
    strategy = make_strategy("raflora_ha", cfg)
    state = strategy.aggregate(strategy.initial_state(), random_updates(schema, CLIENTS, seed=33))
    n = np.array([c[2] for c in CLIENTS], dtype=float)
    ranks = np.array([c[1] for c in CLIENTS])
    W = {int(rho): float(n[ranks >= rho].sum() / n.sum()) for rho in sorted(set(ranks))}
    for _ in range(3):
        updates = []
        for cid, r, k, alpha in CLIENTS:
            s = lora_scaling(alpha, r)
            updates.append(ClientUpdate(cid, r, k, s, strategy.distribute(state, r, s).factors))
        new = strategy.aggregate(state, updates)
        for m in schema:
            before, after = state.modules[m], new.modules[m]
            assert isinstance(before, LowRank) and isinstance(after, LowRank)
            prev = 0
            for rho, share in W.items():
                expected = before.S[prev:rho] * share ** (1 - gamma)
                assert rel_err(after.S[prev:rho], expected) < 1e-6
                prev = rho
        state = new


def test_bad_options(schema: AdapterSchema) -> None:
    for opts, field in (
        ({"gamma": -1.0}, "options.gamma"),
        ({"max_boost": 0.5}, "options.max_boost"),
        ({"shrinkage": "lots"}, "options"),
        ({"nope": 1.0}, "options.nope"),
    ):
        with pytest.raises(ConfigError) as info:
            make_strategy("raflora_ha", StrategyConfig(schema=schema, max_rank=8, options=opts))
        assert info.value.field == field
