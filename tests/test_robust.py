"""Robust weighing in the factored domain against dense NumPy references (docs/design.md §2.8)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raflora.server.engine.robust import (
    Combine,
    RobustPolicy,
    adaptive_bound,
    cap_weights,
    clip_factors,
    defend,
    distances_to_combination,
    geometric_median_weights,
    median_trust,
    norms_from_gram,
    trimmed_trust,
    update_gram,
)
from raflora.server.engine.types import FactorPair

SHAPES = {"q": (9, 7), "v": (5, 8)}


def client(rank: int, seed: int, gain: float = 1.0) -> dict[str, FactorPair]:
    g = torch.Generator().manual_seed(seed)
    return {
        m: FactorPair(
            B=torch.randn(o, rank, generator=g) * gain, A=torch.randn(rank, i, generator=g)
        )
        for m, (o, i) in SHAPES.items()
    }


def dense(f: dict[str, FactorPair], s: float) -> np.ndarray:
    """The effective update over all modules, flattened: the reference's vector."""
    return np.concatenate([(s * (p.B.double() @ p.A.double())).numpy().ravel() for p in f.values()])


def numpy_weiszfeld(X: np.ndarray, p: np.ndarray, iters: int = 5000) -> np.ndarray:
    """Weiszfeld on dense vectors (rows of X), written independently of the engine."""
    z: np.ndarray = p @ X
    for _ in range(iters):
        d = np.maximum(np.linalg.norm(X - z, axis=1), 1e-15)
        w = p / d
        z_next: np.ndarray = w @ X / w.sum()
        if np.linalg.norm(z_next - z) < 1e-13 * np.linalg.norm(z):
            return z_next
        z = z_next
    return z


def test_the_gram_matches_dense_inner_products() -> None:
    factors = [client(r, s) for r, s in [(2, 1), (4, 2), (8, 3), (2, 4)]]
    scales = [2.0, 0.5, 1.5, 4.0]
    X = np.stack([dense(f, s) for f, s in zip(factors, scales, strict=True)])
    G = update_gram(factors, scales)
    np.testing.assert_allclose(G.numpy(), X @ X.T, rtol=1e-10)
    np.testing.assert_allclose(norms_from_gram(G).numpy(), np.linalg.norm(X, axis=1), rtol=1e-10)
    alpha = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    expected = np.linalg.norm(X - alpha.numpy() @ X, axis=1)
    np.testing.assert_allclose(distances_to_combination(G, alpha).numpy(), expected, rtol=1e-8)


def test_weiszfeld_in_the_span_is_the_dense_geometric_median() -> None:
    factors = [client(r, s) for r, s in [(2, 5), (4, 6), (4, 7), (8, 8), (2, 9)]]
    scales = [1.0, 2.0, 0.5, 1.0, 3.0]
    p = np.array([0.1, 0.3, 0.2, 0.25, 0.15])
    X = np.stack([dense(f, s) for f, s in zip(factors, scales, strict=True)])
    alpha = geometric_median_weights(update_gram(factors, scales), torch.tensor(p))
    z = alpha.numpy() @ X
    reference = numpy_weiszfeld(X, p)
    assert np.linalg.norm(z - reference) <= 1e-6 * np.linalg.norm(reference)

    def objective(v: np.ndarray) -> float:
        return float(p @ np.linalg.norm(X - v, axis=1))

    rng = np.random.default_rng(0)
    for _ in range(20):  # no nearby point does better
        assert objective(z) <= objective(z + 1e-3 * rng.standard_normal(z.shape)) + 1e-12


def test_clipping_bounds_every_norm_and_the_adaptive_bound_is_the_quantile() -> None:
    norms = torch.tensor([1.0, 2.0, 3.0, 40.0], dtype=torch.float64)
    c = clip_factors(norms, 2.5)
    assert torch.all(c * norms <= 2.5 + 1e-12) and torch.equal(c[:2], torch.ones(2).double())
    assert adaptive_bound(norms, 0.5) == pytest.approx(float(np.quantile(norms.numpy(), 0.5)))
    with pytest.raises(ValueError, match="bound"):
        clip_factors(norms, 0.0)


def _sign_flip_round() -> tuple[list[dict[str, FactorPair]], list[float], np.ndarray]:
    """Six rank-4 clients around a shared direction; client 5 sends −10× its honest update."""
    base = client(4, 100)
    factors = []
    for k in range(6):
        noise = client(4, 200 + k, gain=0.1)
        factors.append(
            {
                m: FactorPair(
                    B=torch.cat([base[m].B, noise[m].B], 1), A=torch.cat([base[m].A, noise[m].A], 0)
                )
                for m in SHAPES
            }
        )
    scales = [1.0] * 5 + [-10.0]
    p = np.full(6, 1 / 6)
    return factors, scales, p


def test_median_trust_keeps_a_sign_flip_attacker_within_the_stated_bound() -> None:
    factors, scales, p = _sign_flip_round()
    X = np.stack([dense(f, s) for f, s in zip(factors, scales, strict=True)])
    honest = p[:5] @ X[:5] / p[:5].sum()
    plain = p @ X
    t = median_trust(update_gram(factors, scales), torch.tensor(p)).numpy()
    w = t * p / (t * p).sum()
    robust = w @ X
    # robust − honest = w_a (ΔW_a − honest) + (1 − w_a)(honest_t − honest), honest_t the
    # trust-weighted mean of the honest: the attacker's term plus what reweighting the honest
    # costs (also paid without an attacker).
    honest_t = w[:5] @ X[:5] / w[:5].sum()
    bound = w[5] * (np.linalg.norm(X[5]) + np.linalg.norm(honest)) + (1 - w[5]) * np.linalg.norm(
        honest_t - honest
    )
    error = np.linalg.norm(robust - honest)
    assert error <= bound + 1e-12
    assert error <= 0.1 * np.linalg.norm(honest)  # close to the honest-only aggregate ...
    assert np.linalg.norm(plain - honest) > 1.5 * np.linalg.norm(honest)  # ... the plain one isn't
    assert t[:5].min() > 0.5 and t[5] < 0.05


def test_trimming_drops_the_farthest_client() -> None:
    factors, scales, p = _sign_flip_round()
    t = trimmed_trust(update_gram(factors, scales), torch.tensor(p), trim=1)
    assert t.tolist() == [1.0] * 5 + [0.0]
    with pytest.raises(ValueError, match="trim"):
        trimmed_trust(update_gram(factors, scales), torch.tensor(p), trim=6)


def test_zero_uploads_cannot_switch_clipping_off() -> None:
    """Untrained (B = 0) uploads have norm 0: the quantile is taken over the others, and a
    fixed clip_norm always applies."""
    zero = {m: FactorPair(B=torch.zeros(o, 2), A=torch.randn(2, i)) for m, (o, i) in SHAPES.items()}
    loud = client(2, 1, gain=100.0)
    _, _, outcome = defend(
        [zero, zero, loud],
        [1.0, 1.0, 1.0],
        [2, 2, 2],
        torch.full((3,), 1 / 3),
        RobustPolicy(clip_norm=1.0, clip_quantile=0.25),
    )
    assert outcome.clip_bound == pytest.approx(1.0)
    assert outcome.clip[2] * outcome.norms[2] == pytest.approx(1.0)


def test_reweighting_never_lifts_a_client_over_the_weight_cap() -> None:
    factors, scales, p = _sign_flip_round()
    _, new_p, _ = defend(
        factors,
        scales,
        [8] * 6,
        torch.tensor(p) * torch.tensor([2.0, 1, 1, 1, 1, 1], dtype=torch.float64),
        RobustPolicy(combine=Combine.MEDIAN_TRUST, max_weight_share=0.25),
    )
    assert float(new_p.max()) <= 0.25 + 1e-12 and float(new_p.sum()) == pytest.approx(1.0)
    assert float(new_p[5]) < 0.1  # the attacker still lost its weight
    # Trimmed to 0, a client stays at 0; too few others for the cap: they share equally.
    trimmed = cap_weights(torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64), 0.4)
    assert trimmed.tolist() == pytest.approx([0.0, 0.5, 0.5])
    capped = cap_weights(torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64), 0.5)
    assert capped.tolist() == pytest.approx([0.5, 1 / 3, 1 / 6])


def test_trimming_acts_once_per_client_whatever_its_rank() -> None:
    """Ranks [2, 2, 2, 4, 4, 4]: rank-4 clients hold two partitions, but trim=1 drops one."""
    factors = [client(r, 300 + k) for k, r in enumerate([2, 2, 2, 4, 4, 4])]
    _, _, outcome = defend(
        factors,
        [1.0] * 6,
        [2, 2, 2, 4, 4, 4],
        torch.full((6,), 1 / 6),
        RobustPolicy(combine=Combine.TRIMMED, trim=1),
    )
    assert sorted(outcome.trust) == [0.0] + [1.0] * 5
