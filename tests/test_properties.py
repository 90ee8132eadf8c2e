"""Property-based tests over random shapes, ranks, weights, scalings and dtypes."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raflora.server.engine import (
    AdapterSchema,
    ClientUpdate,
    FactorPair,
    FactorSplit,
    ScalingRule,
    StrategyConfig,
    SvdMethod,
    Weighting,
    lora_scaling,
    make_strategy,
)

from . import reference as ref
from .conftest import as_reference, rel_err

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@st.composite
def federations(draw: st.DrawFn) -> tuple[AdapterSchema, int, list[ClientUpdate], torch.dtype]:
    d_out = draw(st.integers(2, 24))
    d_in = draw(st.integers(2, 24))
    R = draw(st.integers(1, 10))
    n_clients = draw(st.integers(1, 6))
    rule = draw(st.sampled_from(list(ScalingRule)))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    schema = AdapterSchema.from_shapes({"m": (d_out, d_in)})
    g = torch.Generator().manual_seed(seed)
    updates = []
    for i in range(n_clients):
        r = draw(st.integers(1, R))
        n = draw(st.integers(1, 1000))
        alpha = draw(st.floats(0.5, 64.0))
        f = FactorPair(
            B=torch.randn(d_out, r, generator=g, dtype=torch.float64).to(dtype),
            A=torch.randn(r, d_in, generator=g, dtype=torch.float64).to(dtype),
        )
        updates.append(ClientUpdate(f"c{i}", r, n, lora_scaling(alpha, r, rule), {"m": f}))
    return schema, R, updates, dtype


def spectral_gap_ok(D: np.ndarray, R: int) -> bool:
    """The rank-R truncation is unique (and comparable) only with a gap at R."""
    S = np.linalg.svd(D, compute_uv=False)
    if len(S) <= R or S[0] == 0:
        return True
    return bool((S[R - 1] - S[R]) / S[0] > 1e-6)


COMMON = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@COMMON
@given(federations(), st.sampled_from(["raflora", "flexlora"]), st.booleans())
def test_spectral_matches_reference(fed, name: str, uniform: bool) -> None:  # type: ignore[no-untyped-def]
    schema, R, updates, _ = fed
    weighting = Weighting.UNIFORM if uniform else Weighting.EXAMPLES
    clients = as_reference(updates)
    formula = ref.raflora if name == "raflora" else ref.flexlora
    expected = formula(clients, "m", R, uniform)
    untruncated = formula(clients, "m", 10**6, uniform)
    results = {}
    for method in (SvdMethod.FACTORED, SvdMethod.DENSE):
        cfg = StrategyConfig(
            schema=schema,
            max_rank=R,
            compute_dtype=torch.float64,
            svd_method=method,
            weighting=weighting,
        )
        strategy = make_strategy(name, cfg)
        results[method] = state = strategy.aggregate(strategy.initial_state(), updates)
        # Singular values are stable regardless of gaps (Weyl).
        S_ref = np.linalg.svd(untruncated, compute_uv=False)[: state.modules["m"].rank]
        assert np.allclose(state.modules["m"].S.numpy(), S_ref, atol=1e-9 * max(S_ref.max(), 1))  # type: ignore[union-attr]
        if spectral_gap_ok(untruncated, R):
            assert rel_err(state.dense("m"), expected) < 1e-7
    assert np.allclose(
        results[SvdMethod.FACTORED].modules["m"].S.numpy(),  # type: ignore[union-attr]
        results[SvdMethod.DENSE].modules["m"].S.numpy(),  # type: ignore[union-attr]
        atol=1e-9 * max(1.0, float(np.abs(untruncated).max())),
    )


@COMMON
@given(federations(), st.sampled_from(list(FactorSplit)), st.data())
def test_client_view_is_best_rank_r(fed, split: FactorSplit, data: st.DataObject) -> None:  # type: ignore[no-untyped-def]
    schema, R, updates, _ = fed
    cfg = StrategyConfig(schema=schema, max_rank=R, compute_dtype=torch.float64, split=split)
    strategy = make_strategy("raflora", cfg)
    state = strategy.aggregate(strategy.initial_state(), updates)
    r = data.draw(st.integers(1, R))
    s = lora_scaling(
        data.draw(st.floats(0.5, 64.0)), r, data.draw(st.sampled_from(list(ScalingRule)))
    )
    f = strategy.distribute(state, r, s).factors["m"]
    D = state.dense("m").numpy()
    S = np.linalg.svd(D, compute_uv=False)
    view = s * (f.B @ f.A).numpy()
    # Eckart–Young: the error of the best rank-r approximation is the discarded spectrum.
    assert np.linalg.norm(D - view) ** 2 <= (S[r:] ** 2).sum() + 1e-9 * max(1.0, (S**2).sum())
    assert bool(torch.isfinite(f.A).all() and torch.isfinite(f.B).all())
    assert bool((f.A.norm(dim=1) > 0).all())  # no dead slots


@COMMON
@given(federations(), st.sampled_from(["hetlora", "rbla", "flora"]))
def test_factor_level_low_precision_matches_upcast_reference(fed, name: str) -> None:  # type: ignore[no-untyped-def]
    schema, R, updates, _ = fed
    strategy = make_strategy(name, StrategyConfig(schema=schema, max_rank=R))
    state = strategy.aggregate(strategy.initial_state(), updates)
    clients = as_reference(updates)
    if name == "flora":
        expected = ref.flora(clients, "m")
    elif name == "hetlora":
        expected = ref.hetlora(clients, "m", R)
    else:
        init = strategy.initial_state().modules["m"]
        prev = (init.B.double().numpy(), init.A.double().numpy())  # type: ignore[union-attr]
        expected = ref.rbla(clients, "m", R, prev)
    # The default compute dtype is float32, whatever the upload's dtype.
    assert state.modules["m"].A.dtype == torch.float32  # type: ignore[union-attr]
    assert rel_err(state.dense("m"), expected) < 1e-5 or np.abs(expected).max() < 1e-12
