"""The factored (QR of stacked factors) and dense paths agree, and the cost model is sane."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raflora.server.engine import (
    FactorPair,
    SvdMethod,
    choose_method,
    lowrank,
    truncated_svd_of_sum,
)
from raflora.server.engine.lowrank import (
    OVERSAMPLE,
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


def low_rank_plus_noise(
    d: int, R: int, clients: int, rank: int, noise: float, seed: int
) -> list[FactorPair]:
    """Clients near one shared rank-R adapter: the spectrum a real federation produces."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(d, R, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(d, R, generator=g, dtype=torch.float64))
    S = torch.linspace(4.0, 1.0, R, dtype=torch.float64)
    return [
        FactorPair(
            B=U[:, :rank] * S[:rank]
            + noise * torch.randn(d, rank, generator=g, dtype=torch.float64),
            A=V[:, :rank].T + noise * torch.randn(rank, d, generator=g, dtype=torch.float64),
        )
        for _ in range(clients)
    ]


def test_randomized_path_is_certified_and_matches_exact() -> None:
    from raflora.server.engine.lowrank import randomized_svd, worth_randomizing

    t = low_rank_plus_noise(256, 8, 25, 8, 1e-3, seed=5)
    n = sum(x.rank for x in t)
    assert worth_randomizing(256, 256, n, 8)  # AUTO takes this path for such a round
    fast = randomized_svd(t, 8)
    assert fast is not None
    exact = truncated_svd_of_sum(t, 8, SvdMethod.EXACT)
    assert torch.allclose(fast.S, exact.S, rtol=1e-6)
    assert rel_err(fast.dense(), exact.dense()) < 1e-5
    auto = truncated_svd_of_sum(t, 8, SvdMethod.AUTO)
    assert torch.equal(auto.S, fast.S)  # deterministic (seeded sketch)


def test_randomized_path_falls_back_when_it_cannot_certify() -> None:
    """A flat spectrum has no gap at R: the sketch cannot certify, and the exact path runs."""
    from raflora.server.engine.lowrank import randomized_svd

    t = terms(64, 64, [8] * 20, seed=9)
    assert randomized_svd(t, 8) is None
    via = truncated_svd_of_sum(t, 8, SvdMethod.RANDOMIZED)
    exact = truncated_svd_of_sum(t, 8, SvdMethod.EXACT)
    assert torch.equal(via.S, exact.S) and torch.equal(via.U, exact.U)


def planted_round(pieces: int, hidden_from: int) -> list[FactorPair]:
    """A round whose top direction (σ = 1.1) is orthogonal to the first ``hidden_from``
    columns the engine's seeded sketches draw (the narrow Ω, then the wide one), and whose
    ``pieces`` other directions are orthogonal to it on both sides: a range finder from those
    columns never sees it."""
    d, n, k = 96, pieces + 1, 4 + OVERSAMPLE
    gen = torch.Generator().manual_seed(0x5EED)  # the engine's draws, in its order
    narrow = torch.randn(d, min(k, n), generator=gen)
    wide = torch.randn(d, min(2 * k, n), generator=gen)
    omega = torch.cat([narrow, wide], 1)[:, :hidden_from].double()
    basis, _ = torch.linalg.qr(torch.cat([omega, torch.randn(d, d, dtype=torch.float64)], 1))
    v_top = basis[:, hidden_from]  # orthogonal to every hidden-from column
    g = torch.Generator().manual_seed(3)
    left, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    u_top = left[:, 0]
    U_rest = left[:, 1 : pieces + 1]  # ⊥ u_top
    V_rest, _ = torch.linalg.qr(  # ⊥ v_top
        (torch.eye(d, dtype=torch.float64) - torch.outer(v_top, v_top))
        @ torch.randn(d, pieces, generator=g, dtype=torch.float64)
    )
    # When the rest fills a sketch exactly (as many components as it has columns, none spare
    # for rounding to leak the planted direction into), its top R are exact triplets.
    sigma = torch.linspace(1.0, 0.5, pieces, dtype=torch.float64)
    t = [FactorPair(B=(1.1 * u_top)[:, None], A=v_top[None, :])]
    return t + [
        FactorPair(B=(U_rest[:, j] * sigma[j])[:, None], A=V_rest[:, j][None, :])
        for j in range(pieces)
    ]


def test_a_top_direction_the_sketch_cannot_see_is_caught() -> None:
    """Adversarial: the top direction is hidden from the narrow sketch, so every triplet it
    finds passes its residual check with σ₁ = 1.0. The tail bound from fresh secret probes
    catches what it missed; the wider second sketch (fresh columns) then finds σ₁ = 1.1."""
    from raflora.server.engine.lowrank import randomized_svd

    R = 4
    t = planted_round(pieces=R + OVERSAMPLE, hidden_from=R + OVERSAMPLE)
    exact = truncated_svd_of_sum(t, R, SvdMethod.EXACT)
    assert float(exact.S[0]) == pytest.approx(1.1)
    assert randomized_svd(t, R, widen=False) is None  # before the tail bound: "certified"
    wide = randomized_svd(t, R)
    assert wide is not None
    assert torch.allclose(wide.S, exact.S, rtol=1e-5)


def test_a_top_direction_hidden_from_both_sketches_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same, hidden from the wide sketch's columns too, with a rest that fills it: the
    wide sketch finds exact triplets with σ₁ = 1.0 and the bound refuses them as well; the
    exact path publishes σ₁ = 1.1."""
    from raflora.server.engine.lowrank import randomized_svd

    R = 4
    k = R + OVERSAMPLE
    t = planted_round(pieces=2 * k, hidden_from=3 * k)
    assert randomized_svd(t, R) is None
    with monkeypatch.context() as without_bound:  # what the bound is there for
        without_bound.setattr(lowrank, "deflated_probe_bound", lambda *_: 0.0)
        fooled = randomized_svd(t, R)
        assert fooled is not None and float(fooled.S[0]) == pytest.approx(1.0)
    via = truncated_svd_of_sum(t, R, SvdMethod.RANDOMIZED)
    assert float(via.S[0]) == pytest.approx(1.1)


def test_a_round_of_few_directions_without_a_clear_gap_is_certified_by_the_wide_sketch() -> None:
    """30 directions with a flat spectrum (σ 1.0 … 0.3), R = 8: the narrow sketch (24 wide)
    misses directions as large as σ₂₅ = 0.4 and cannot prove the gap σ₈ − σ₉ = 0.024; the
    wide one holds them all and certifies the exact top 8 (the bench's 64-client round: rank
    60, R = 32; docs/benchmarks.md)."""
    from raflora.server.engine.lowrank import randomized_svd

    g = torch.Generator().manual_seed(17)
    d, R, rank = 256, 8, 30
    U, _ = torch.linalg.qr(torch.randn(d, rank, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(d, rank, generator=g, dtype=torch.float64))
    sigma = torch.linspace(1.0, 0.3, rank, dtype=torch.float64)
    t = [FactorPair(B=U[:, j : j + 1] * sigma[j], A=V[:, j : j + 1].T) for j in range(rank)]
    assert randomized_svd(t, R, widen=False) is None
    wide = randomized_svd(t, R)
    assert wide is not None
    exact = truncated_svd_of_sum(t, R, SvdMethod.EXACT)
    assert torch.allclose(wide.S, sigma[:R], rtol=1e-9)
    assert rel_err(wide.dense(), exact.dense()) < 1e-8


def test_a_small_but_wide_tail_is_certified_after_one_power_iteration() -> None:
    """A gap of 30× at R with hundreds of tail values (the 32-client LLaMA round): the
    probe bound must be tight enough to see the gap, and one power iteration enough."""
    from raflora.server.engine.lowrank import randomized_svd

    g = torch.Generator().manual_seed(21)
    d, R, tail = 1024, 16, 400
    U, _ = torch.linalg.qr(torch.randn(d, R + tail, generator=g))
    V, _ = torch.linalg.qr(torch.randn(d, R + tail, generator=g))
    sigma = torch.cat([torch.linspace(2.0, 0.3, R), torch.full((tail,), 0.005)])
    t = [
        FactorPair(B=U[:, j : j + 8] * sigma[j : j + 8], A=V[:, j : j + 8].T)
        for j in range(0, R + tail, 8)
    ]
    # ‖tail‖_F = 0.1 is a third of σ_R = 0.3: a bound of 8× a probe norm (α = 10) would not
    # certify it; 1.6× (α = 2, 36 probes) does.
    fast = randomized_svd(t, R, power_iterations=1)
    assert fast is not None
    exact = truncated_svd_of_sum(t, R, SvdMethod.EXACT)
    assert torch.allclose(fast.S, exact.S, rtol=1e-5)
    assert rel_err(fast.dense(), exact.dense()) < 1e-4


def test_auto_randomizes_where_it_is_cheaper_at_llama_shapes() -> None:
    """docs/benchmarks.md: at 4096² and R = 64 the factored path wins at 8 clients (N = 208)
    and the certified sketch at 32 (N = 732) and 100 (N = 2588)."""
    from raflora.server.engine.lowrank import worth_randomizing

    assert not worth_randomizing(4096, 4096, 208, 64)
    assert worth_randomizing(4096, 4096, 732, 64)
    assert worth_randomizing(4096, 4096, 2588, 64)


def test_every_path_publishes_the_same_signs() -> None:
    """Singular vectors are fixed only up to a joint sign: the engine picks one (largest entry
    of each u_j positive), so the paths, and a restarted server, serve the same factors."""
    from raflora.server.engine.lowrank import canonical_signs

    t = low_rank_plus_noise(96, 6, 12, 6, 1e-3, seed=8)
    results = [truncated_svd_of_sum(t, 6, m) for m in (SvdMethod.FACTORED, SvdMethod.DENSE)]
    for r in results:
        top = r.U.gather(0, r.U.abs().argmax(dim=0)[None, :])
        assert bool((top > 0).all())
    assert torch.allclose(results[0].U, results[1].U, atol=1e-8)
    assert torch.allclose(results[0].V, results[1].V, atol=1e-8)
    flipped = canonical_signs(type(results[0])(-results[0].U, results[0].S, -results[0].V))
    assert torch.equal(flipped.U, results[0].U) and torch.equal(flipped.V, results[0].V)


@pytest.mark.parametrize(
    "rows, cols, rank", [(48, 1024, 48), (48, 1024, 5), (7, 7, 7), (60, 20, 20), (1, 9, 1)]
)
def test_the_certificates_svd_of_a_wide_matrix_is_lapacks(rows: int, cols: int, rank: int) -> None:
    """_svd_of_wide (QR of Mᵀ, then the SVD of R) against LAPACK's SVD of M itself: the same
    singular values, orthonormal factors, and M rebuilt; rank-deficient and tall inputs too."""
    g = torch.Generator().manual_seed(rows * cols + rank)
    M = torch.randn(rows, rank, generator=g, dtype=torch.float64) @ torch.randn(
        rank, cols, generator=g, dtype=torch.float64
    )
    U, S, V = lowrank._svd_of_wide(M)
    expected = torch.linalg.svdvals(M)
    assert torch.allclose(S, expected, rtol=1e-12, atol=1e-12 * float(expected[0]))
    k = min(rows, cols)
    assert U.shape == (rows, k) and V.shape == (cols, k)
    floor = 1e-10 * float(S[0])
    top = S.gt(floor)  # the directions of a rank-deficient M's null part are arbitrary
    eye = torch.eye(int(top.sum()), dtype=M.dtype)
    assert torch.allclose(U[:, top].T @ U[:, top], eye, atol=1e-12)
    assert torch.allclose(V[:, top].T @ V[:, top], eye, atol=1e-12)
    assert rel_err((U * S) @ V.T, M) < 1e-12


def test_svd_of_a_wide_fp32_matrix_by_its_gram_is_as_good_as_lapack() -> None:
    """The fp32 route of _svd_of_wide (eigh of M Mᵀ in float64) against LAPACK's float64 SVD
    of the same matrix: singular values and the rebuilt matrix to fp32 accuracy, orthonormal
    factors where σ is above fp32's noise, over a spread of 1e6."""
    g = torch.Generator().manual_seed(31)
    k, d = 48, 1024
    U0, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
    V0, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
    sigma = torch.logspace(0, -6, k, dtype=torch.float64)
    M = ((U0 * sigma) @ V0.T).float()
    U, S, V = lowrank._svd_of_wide(M)
    assert U.dtype == S.dtype == V.dtype == torch.float32
    expected = torch.linalg.svdvals(M.double())
    assert torch.allclose(S.double(), expected, rtol=1e-5, atol=1e-7)
    top = expected.gt(1e-4)
    eye = torch.eye(int(top.sum()), dtype=torch.float64)
    assert torch.allclose(U[:, top].double().T @ U[:, top].double(), eye, atol=1e-5)
    assert torch.allclose(V[:, top].double().T @ V[:, top].double(), eye, atol=1e-5)
    assert rel_err((U * S) @ V.T, M) < 1e-5
    # Keeping directions as small as 1e-6·σ₁: the Gram's V would lose orthogonality there, so
    # the QR route runs and every kept V_j is orthonormal.
    _, _, V_all = lowrank._svd_of_wide(M, keep=k)
    eye = torch.eye(k, dtype=torch.float64)
    assert torch.allclose(V_all.double().T @ V_all.double(), eye, atol=1e-5)


def held_sketch(t: list[FactorPair], max_rank: int) -> lowrank.Sketched:
    """ΔW Ω and ΔW G formed densely, as a caller accumulating them would hold them."""
    W = sum(
        (p.B @ p.A for p in t), torch.zeros(t[0].B.shape[0], t[0].A.shape[1], dtype=t[0].B.dtype)
    )
    d_in = int(W.shape[1])
    omega = lowrank.sketch_start(d_in, max_rank + OVERSAMPLE, W.dtype, "cpu")
    return lowrank.Sketched(W @ omega, W @ lowrank.secret_probes(d_in, W.dtype, "cpu"), 0.0)


def test_a_held_sketch_gives_the_result_of_the_sketch_it_stands_for() -> None:
    """The first product handed in is the one the randomized path would compute (same Ω):
    the same triplets, certified by the held probes, narrow and, where the narrow sketch
    cannot certify, wide (whose Ω is the same draw either way)."""
    from raflora.server.engine.lowrank import randomized_svd

    t = low_rank_plus_noise(256, 8, 25, 8, 1e-3, seed=5)
    fresh, held = randomized_svd(t, 8), randomized_svd(t, 8, given=held_sketch(t, 8))
    assert fresh is not None and held is not None
    assert rel_err(held.dense(), fresh.dense()) < 1e-9
    assert torch.allclose(held.S, fresh.S, rtol=1e-12)
    R = 4
    planted = planted_round(pieces=R + OVERSAMPLE, hidden_from=R + OVERSAMPLE)
    given = held_sketch(planted, R)
    assert randomized_svd(planted, R, widen=False, given=given) is None  # the probes saw it
    wide_fresh, wide_held = randomized_svd(planted, R), randomized_svd(planted, R, given=given)
    assert wide_fresh is not None and wide_held is not None
    assert torch.allclose(wide_held.S, wide_fresh.S, rtol=1e-12)
    assert float(wide_held.S[0]) == pytest.approx(1.1)
