"""The factored (QR of stacked factors) and dense paths agree, and the cost model is sane."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raflora.server.engine import FactorPair, SvdMethod, choose_method, truncated_svd_of_sum
from raflora.server.engine.lowrank import (
    dense_cost,
    factored_cost,
    frobenius_norm_of_product,
    singular_values_of_product,
)

from .conftest import rel_err


def terms(d_out: int, d_in: int, ranks: list[int], seed: int) -> list[FactorPair]:
    g = torch.Generator().manual_seed(seed)
    return [
        FactorPair(
            B=torch.randn(d_out, r, generator=g, dtype=torch.float64),
            A=torch.randn(r, d_in, generator=g, dtype=torch.float64),
        )
        for r in ranks
    ]


@pytest.mark.parametrize(
    ("d_out", "d_in", "ranks", "R"),
    [
        (40, 30, [2, 4, 8], 8),  # Σr < min(d)
        (12, 20, [4, 8, 8], 6),  # Σr > d_out: stacked QR is rank-deficient
        (30, 9, [16, 16], 9),  # Σr > d_in, R = d_in
        (25, 25, [1], 4),  # fewer directions than R
    ],
)
def test_factored_and_dense_paths_agree(d_out: int, d_in: int, ranks: list[int], R: int) -> None:
    t = terms(d_out, d_in, ranks, seed=sum(ranks))
    fac = truncated_svd_of_sum(t, R, SvdMethod.FACTORED)
    den = truncated_svd_of_sum(t, R, SvdMethod.DENSE)
    D = sum(x.B @ x.A for x in t)
    assert isinstance(D, torch.Tensor)
    U, S, Vt = np.linalg.svd(D.numpy())
    k = min(R, len(S), sum(ranks))
    assert fac.rank == den.rank == k
    assert np.allclose(fac.S.numpy(), S[:k], rtol=1e-10, atol=1e-10 * S[0])
    assert np.allclose(den.S.numpy(), S[:k], rtol=1e-10, atol=1e-10 * S[0])
    best = (U[:, :k] * S[:k]) @ Vt[:k]
    assert rel_err(fac.dense(), best) < 1e-9
    assert rel_err(den.dense(), best) < 1e-9
    for lr in (fac, den):
        assert np.allclose(lr.U.T @ lr.U, np.eye(k), atol=1e-10)
        assert np.allclose(lr.V.T @ lr.V, np.eye(k), atol=1e-10)


def test_cost_model_prefers_factored_for_few_clients_and_dense_past_the_dimension() -> None:
    assert choose_method(4096, 4096, 8 * 25) is SvdMethod.FACTORED
    assert choose_method(64, 64, 10_000) is SvdMethod.DENSE
    assert factored_cost(4096, 4096, 200) < dense_cost(4096, 4096, 200) / 100


def test_product_helpers_match_dense() -> None:
    (t,) = terms(17, 23, [5], seed=3)
    D = (t.B @ t.A).numpy()
    assert np.allclose(singular_values_of_product(t.B, t.A).numpy(), np.linalg.svd(D)[1][:5])
    assert float(frobenius_norm_of_product(t.B, t.A)) == pytest.approx(np.linalg.norm(D))
