"""A round summed as its uploads arrive (engine/sums.py) closes to what the one-shot path and
the independent NumPy reference give, in any arrival order, and refuses what it cannot be."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np
import pytest
import torch
from torch import Tensor

from raflora.server.engine import (
    AdapterSchema,
    ClientUpdate,
    FactorPair,
    GlobalState,
    InvalidUpdateError,
    LowRank,
    NonFiniteError,
    Strategy,
    StrategyConfig,
    SvdMethod,
    Weighting,
    lowrank,
    make_strategy,
)
from raflora.server.engine import sums as sums_module
from raflora.server.engine.lowrank import randomized_svd_dense, truncated_svd_of_dense
from raflora.server.engine.privacy import PrivacyPolicy
from raflora.server.engine.robust import RobustPolicy
from raflora.server.engine.sums import RoundSums, SumsMismatchError, can_sum

from . import reference
from .conftest import CLIENTS, as_reference, random_updates, rel_err
from .test_lowrank import planted_round

R = 8


def summed(
    strategy_name: str, updates: Sequence[ClientUpdate], max_rank: int = R, **config: object
) -> tuple[Strategy, GlobalState, RoundSums]:
    schema = AdapterSchema.from_shapes(
        {name: (f.B.shape[0], f.A.shape[1]) for name, f in updates[0].factors.items()}
    )
    cfg = StrategyConfig(schema=schema, max_rank=max_rank, **config)  # type: ignore[arg-type]
    strategy = make_strategy(strategy_name, cfg)
    state = strategy.initial_state()
    sums = RoundSums(strategy, state)
    for u in updates:
        sums.add(u)
    return strategy, state, sums


@pytest.mark.parametrize("flush", [1, 10**9])  # every upload added at once / all at the close
@pytest.mark.parametrize("order", list(itertools.permutations(range(len(CLIENTS))))[::17])
def test_any_arrival_order_closes_to_the_reference(
    schema: AdapterSchema, order: tuple[int, ...], flush: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ranks arriving largest first, smallest first or mixed cut the intervals differently;
    the close is raFLoRA's partition form computed independently in NumPy."""
    monkeypatch.setattr(sums_module, "FLUSH_COLUMNS", flush)
    updates = random_updates(schema, CLIENTS)
    strategy, state, sums = summed(
        "raflora", [updates[i] for i in order], compute_dtype=torch.float64
    )
    assert sums.bounds == sorted({u.rank for u in updates})
    got = sums.aggregate(state, updates)
    for m in schema:
        want = reference.raflora(as_reference(updates), m, R)
        assert rel_err(got.dense(m), want) < 1e-10
    assert got.participant_ranks == tuple(u.rank for u in updates)
    assert got.weights == strategy.aggregate(state, updates).weights


@pytest.mark.parametrize("name", ["flexlora", "raflora", "raflora_ha"])
@pytest.mark.parametrize("weighting", list(Weighting))
def test_every_spectral_strategy_matches_its_one_shot_close(
    schema: AdapterSchema, name: str, weighting: Weighting
) -> None:
    updates = random_updates(schema, CLIENTS)
    strategy, state, sums = summed(
        name, updates[::-1], compute_dtype=torch.float64, weighting=weighting
    )
    got = sums.aggregate(state, updates)
    want = strategy.aggregate(state, updates)
    for m in schema:
        assert rel_err(got.dense(m), want.dense(m)) < 1e-10
        assert got.modules[m].rank == want.modules[m].rank
    assert got.weights == pytest.approx(want.weights, rel=1e-12)


def test_carried_components_are_added_as_the_one_shot_close_adds_them(
    schema: AdapterSchema,
) -> None:
    """raflora_ha carries the previous state's components past this round's largest rank:
    a round of rank-2 clients after one of rank 8."""
    first = random_updates(schema, CLIENTS)
    cfg = StrategyConfig(schema=schema, max_rank=R, compute_dtype=torch.float64)
    strategy = make_strategy("raflora_ha", cfg)
    previous = strategy.aggregate(strategy.initial_state(), first)
    second = random_updates(schema, [c for c in CLIENTS if c[1] == 2], seed=5)
    sums = RoundSums(strategy, previous)
    for u in second:
        sums.add(u)
    got, want = sums.aggregate(previous, second), strategy.aggregate(previous, second)
    for m in schema:
        assert rel_err(got.dense(m), want.dense(m)) < 1e-10
        assert rel_err(got.dense(m), previous.dense(m)) > 1e-3  # the round changed it


def in_float64(updates: Sequence[ClientUpdate]) -> list[ClientUpdate]:
    return [
        ClientUpdate(
            u.client_id,
            u.rank,
            u.num_examples,
            u.scale,
            {"m": FactorPair(u.factors["m"].B.double(), u.factors["m"].A.double())},
        )
        for u in updates
    ]


def distinct_round(d: int, clients: int, ranks: Sequence[int]) -> list[ClientUpdate]:
    """A shared adapter plus each client's own noise: the sum has a decaying spectrum and N
    near d (the bench's 64-client round, scaled down)."""
    g = torch.Generator().manual_seed(7)
    top = max(ranks)
    shared = (torch.randn(d, top, generator=g) * 0.1, torch.randn(top, d, generator=g) * 0.1)
    out = []
    for i in range(clients):
        r = ranks[i % len(ranks)]
        B = shared[0][:, :r] + 0.01 * torch.randn(d, r, generator=g)
        A = shared[1][:r] + 0.01 * torch.randn(r, d, generator=g)
        out.append(ClientUpdate(f"c{i}", r, 10 + i, 2.0, {"m": FactorPair(B, A)}))
    return out


@pytest.mark.parametrize("flush", [64, 10**9])  # the default / every column left factored
def test_fp32_summed_close_is_certified_and_agrees_with_the_one_shot_close(
    monkeypatch: pytest.MonkeyPatch, flush: int
) -> None:
    """In the service's dtype, where the sketch (not LAPACK's SVD) runs, on the sums beside
    the columns not yet added to them, or on the factors alone when every column is still
    pending: it starts from the sketches the sums hold, is certified, and agrees with the
    one-shot close and with float64 truth to fp32 tolerance."""
    monkeypatch.setattr(sums_module, "FLUSH_COLUMNS", flush)
    updates = distinct_round(256, 24, [4, 8, 16])
    strategy, state, sums = summed("raflora", updates, max_rank=16)
    assert sums.width == 8 * 28
    assert sums.pays()
    assert (sums.pending_columns == sums.width) == (flush > sums.width)
    certified: list[tuple[str, bool, bool]] = []

    def spying(path: str, run: Callable[..., LowRank | None]) -> Callable[..., LowRank | None]:
        def spy(*args: object, **kwargs: object) -> LowRank | None:
            found = run(*args, **kwargs)
            certified.append((path, kwargs.get("given") is not None, found is not None))
            return found

        return spy

    monkeypatch.setattr(lowrank, "randomized_svd_dense", spying("dense", randomized_svd_dense))
    monkeypatch.setattr(lowrank, "randomized_svd", spying("factors", lowrank.randomized_svd))
    got = sums.aggregate(state, updates)
    assert certified == [("dense" if flush <= sums.width else "factors", True, True)]
    want = strategy.aggregate(state, updates)
    assert rel_err(got.dense("m"), want.dense("m")) < 1e-5
    exact = make_strategy(
        "raflora",
        StrategyConfig(schema=strategy.schema, max_rank=16, compute_dtype=torch.float64),
    )
    as64 = in_float64(updates)
    truth = exact.aggregate(exact.initial_state(), as64)
    assert rel_err(got.dense("m"), truth.dense("m")) < 1e-5


def test_a_round_neither_sketched_nor_summed_is_left_to_the_one_shot_close() -> None:
    """A burst: every upload arrived while others streamed in, so nothing was computed; the
    sums' close would do the one-shot close's work and more, so they decline. Once sketched,
    the close from the factors starts from the sketches and is the cheaper one."""
    updates = distinct_round(256, 24, [4, 8, 16])
    strategy = make_strategy(
        "raflora", StrategyConfig(schema=AdapterSchema.from_shapes({"m": (256, 256)}), max_rank=16)
    )
    sums = RoundSums(strategy, strategy.initial_state())
    for u in updates:
        sums.add(u, flush=False)
    assert sums.unsketched_columns == sums.pending_columns == sums.width
    assert not sums.pays()
    sums.sketch()
    assert sums.pays()


def test_a_lone_top_rank_client_of_few_examples_still_certifies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """raFLoRA gives a lone holder of the top rank the largest coefficient (1 / its
    examples): the sketches' rounding allowance weighs each upload by its own interval's
    coefficient, so it stays far under the gap and the sketch still certifies, whatever the
    others' examples."""
    updates = distinct_round(256, 24, [4, 8])
    updates = [ClientUpdate(u.client_id, u.rank, 10_000, u.scale, u.factors) for u in updates[:-1]]
    top = distinct_round(256, 1, [16])[0]
    updates.append(ClientUpdate("lone", 16, 1, top.scale, top.factors))
    _, state, sums = summed("raflora", updates, max_rank=16)
    certified: list[bool] = []

    def spying(run: Callable[..., LowRank | None]) -> Callable[..., LowRank | None]:
        def spy(*args: object, **kwargs: object) -> LowRank | None:
            found = run(*args, **kwargs)
            certified.append(kwargs.get("given") is not None and found is not None)
            return found

        return spy

    monkeypatch.setattr(lowrank, "randomized_svd_dense", spying(randomized_svd_dense))
    monkeypatch.setattr(lowrank, "randomized_svd", spying(lowrank.randomized_svd))
    sums.aggregate(state, updates)
    assert certified == [True]


def test_carried_components_are_in_the_sketch_the_close_starts_from(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """raflora_ha with shrinkage 0 is raFLoRA with carry-over: the close's first product is
    (the round's partition form + the previous state's components past its ranks) Ω, both
    computed independently, at a width where the sketch is used."""
    handed: list[lowrank.Sketched] = []

    def recorded(*args: object) -> lowrank.Sketched:
        handed.append(lowrank.Sketched(*args))  # type: ignore[arg-type]
        return handed[-1]

    monkeypatch.setattr(sums_module, "Sketched", recorded)
    first = distinct_round(64, 12, [8])
    second = distinct_round(64, 12, [2, 4])
    schema = AdapterSchema.from_shapes({"m": (64, 64)})
    cfg = StrategyConfig(
        schema=schema, max_rank=8, compute_dtype=torch.float64, options={"shrinkage": 0.0}
    )
    strategy = make_strategy("raflora_ha", cfg)
    as64 = in_float64([*first, *second])
    previous = strategy.aggregate(strategy.initial_state(), as64[:12])
    sums = RoundSums(strategy, previous)
    for u in as64[12:]:
        sums.add(u)
    got = sums.aggregate(previous, as64[12:])
    old = previous.modules["m"]
    assert isinstance(old, LowRank)
    carried = (old.U[:, 4:].numpy() * old.S[4:].numpy()) @ old.V[:, 4:].numpy().T
    D = reference.raflora_sum(as_reference(as64[12:]), "m") + carried
    omega = lowrank.sketch_start(64, 8 + lowrank.OVERSAMPLE, torch.float64, "cpu").numpy()
    (given,) = handed
    assert np.abs(given.start.numpy() - D @ omega).max() < 1e-12 * np.linalg.norm(D)
    assert rel_err(got.dense("m"), reference.truncate(D, 8)) < 1e-10


def test_columns_left_pending_close_as_if_they_had_been_added(schema: AdapterSchema) -> None:
    updates = random_updates(schema, CLIENTS)
    strategy = make_strategy(
        "raflora", StrategyConfig(schema=schema, max_rank=R, compute_dtype=torch.float64)
    )
    state = strategy.initial_state()
    lazy, eager = RoundSums(strategy, state), RoundSums(strategy, state)
    for u in updates:
        lazy.add(u, flush=False)
        eager.add(u)
    assert lazy.pending_columns == lazy.width
    got = lazy.aggregate(state, updates)
    lazy.flush(min_columns=1)
    assert lazy.pending_columns == 0
    for m in schema:
        assert rel_err(got.dense(m), lazy.aggregate(state, updates).dense(m)) < 1e-12
        assert rel_err(got.dense(m), eager.aggregate(state, updates).dense(m)) < 1e-12


def test_few_uploads_close_from_the_factors_instead() -> None:
    updates = distinct_round(256, 3, [4, 8, 16])
    _, _, sums = summed("raflora", updates, max_rank=16)
    assert not sums.pays()  # N = 28: the factored close is cheaper


def test_the_sums_refuse_a_close_they_do_not_stand_for(schema: AdapterSchema) -> None:
    updates = random_updates(schema, CLIENTS)
    strategy, state, sums = summed("raflora", updates, compute_dtype=torch.float64)
    with pytest.raises(SumsMismatchError):  # one client fewer
        sums.aggregate(state, updates[1:])
    capped = [  # an influence cap moved the weights away from the examples
        ClientUpdate(u.client_id, u.rank, 100, u.scale, u.factors) for u in updates
    ]
    with pytest.raises(SumsMismatchError, match="weigh"):
        sums.aggregate(state, capped)
    other_scale = [
        ClientUpdate(u.client_id, u.rank, u.num_examples, u.scale * 2, u.factors) for u in updates
    ]
    with pytest.raises(SumsMismatchError):
        sums.aggregate(state, other_scale)
    with pytest.raises(SumsMismatchError, match="state"):
        sums.aggregate(strategy.initial_state(), updates)
    with pytest.raises(InvalidUpdateError, match="summed already"):
        sums.add(updates[0])


def test_an_invalid_upload_is_refused_and_leaves_the_sums_as_they_were(
    schema: AdapterSchema,
) -> None:
    updates = random_updates(schema, CLIENTS)
    strategy, state, sums = summed("raflora", updates[:3], compute_dtype=torch.float64)
    before = sums.held_bytes, sums.bounds[:], sums.clients()
    bad_factors = dict(updates[3].factors)
    name = next(iter(bad_factors))
    B = bad_factors[name].B.clone()
    B[0, 0] = float("nan")
    bad_factors[name] = FactorPair(B, bad_factors[name].A)
    with pytest.raises(NonFiniteError):
        sums.add(ClientUpdate("intruder", updates[3].rank, 5, 1.0, bad_factors))
    assert (sums.held_bytes, sums.bounds, sums.clients()) == before
    got = sums.aggregate(state, updates[:3])
    want = strategy.aggregate(state, updates[:3])
    for m in schema:
        assert rel_err(got.dense(m), want.dense(m)) < 1e-10


def test_memory_is_one_dense_matrix_and_sketch_per_module_and_interval(
    schema: AdapterSchema,
) -> None:
    """Per interval, each module's d_out × d_in sum and its d_out × (k + probes) sketch; once,
    the sketch's [Ω G] for each input width."""
    updates = random_updates(schema, CLIENTS)
    strategy = make_strategy("raflora", StrategyConfig(schema=schema, max_rank=R))
    sums = RoundSums(strategy, strategy.initial_state())
    width = R + lowrank.OVERSAMPLE + lowrank.PROBES
    modules = schema.modules.values()
    per_interval = sum(s.d_out * (s.d_in + width) for s in modules) * 4
    basis = sum({s.d_in for s in modules}) * width * 4
    assert sums.held_bytes == 0 and sums.bytes_with(4) == per_interval + basis
    for u in updates:
        sums.add(u)
    assert sums.held_bytes == len({u.rank for u in updates}) * per_interval + basis
    assert sums.bytes_with(8) == sums.held_bytes and sums.bytes_with(3) > sums.held_bytes


def test_only_rounds_that_are_weighted_sums_can_be_summed(schema: AdapterSchema) -> None:
    def strategy(name: str, **kw: object):  # type: ignore[no-untyped-def]
        return make_strategy(name, StrategyConfig(schema=schema, max_rank=R, **kw))  # type: ignore[arg-type]

    assert can_sum(strategy("raflora"))
    assert not can_sum(strategy("hetlora"))
    assert not can_sum(strategy("raflora", svd_method=SvdMethod.FACTORED))
    assert not can_sum(strategy("raflora", robust=RobustPolicy(clip_norm=1.0)))
    private = strategy(
        "raflora",
        weighting=Weighting.UNIFORM,
        privacy=PrivacyPolicy(noise_multiplier=1.0, clip_norm=1.0),
    )
    assert not can_sum(private)
    with pytest.raises(SumsMismatchError):
        RoundSums(private, private.initial_state())


@pytest.mark.parametrize("path", ["sums", "factors"])  # which close the cost model picks
@pytest.mark.parametrize("sketched", ["every", "all but the last", "first half", "none"])
@pytest.mark.parametrize("flush", [1, 10**9])  # every upload added at once / all at the close
@pytest.mark.parametrize("order", list(itertools.permutations(range(len(CLIENTS))))[::29])
def test_the_close_starts_from_the_rounds_sum_times_omega_and_the_probes(
    schema: AdapterSchema,
    order: tuple[int, ...],
    flush: int,
    sketched: str,
    path: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sketches are kept as uploads arrive, through every cut of an interval, and what
    was not sketched yet is at the close: what the close hands the randomized path is ΔW Ω
    and ΔW G, with ΔW computed independently, whichever close it takes; and that close is
    the partition form computed independently."""
    monkeypatch.setattr(sums_module, "FLUSH_COLUMNS", flush)
    costs = (0.0, 1.0) if path == "sums" else (1.0, 0.0)  # (from the sums, from the factors)
    monkeypatch.setattr(RoundSums, "_close_costs", lambda self, d_out, d_in: costs)
    drawn: dict[int, Tensor] = {}

    def known_probes(d_in: int, dtype: torch.dtype, device: object) -> Tensor:
        gen = torch.Generator().manual_seed(d_in)
        drawn[d_in] = torch.randn(d_in, lowrank.PROBES, generator=gen, dtype=dtype)
        return drawn[d_in]

    handed: list[lowrank.Sketched] = []

    def recorded(*args: object) -> lowrank.Sketched:
        handed.append(lowrank.Sketched(*args))  # type: ignore[arg-type]
        return handed[-1]

    monkeypatch.setattr(lowrank, "secret_probes", known_probes)  # sketch_basis draws G
    monkeypatch.setattr(sums_module, "Sketched", recorded)
    updates = random_updates(schema, CLIENTS)
    cfg = StrategyConfig(schema=schema, max_rank=R, compute_dtype=torch.float64)
    strategy = make_strategy("raflora", cfg)
    state = strategy.initial_state()
    sums = RoundSums(strategy, state)
    count = len(order)
    sketch_first = {"every": count, "all but the last": count - 1, "first half": count // 2}
    for n, i in enumerate(order):
        sums.add(updates[i], flush=False)
        if n < sketch_first.get(sketched, 0):
            sums.sketch()
        sums.flush()
    assert (sums.unsketched_columns == 0) == (sketched == "every")
    got = sums.aggregate(state, updates)
    assert len(handed) == len(schema.modules)
    for (name, shape), given in zip(schema.modules.items(), handed, strict=True):
        D = reference.raflora_sum(as_reference(updates), name)
        omega = lowrank.sketch_start(shape.d_in, R + lowrank.OVERSAMPLE, torch.float64, "cpu")
        scale = np.linalg.norm(D)
        assert np.abs(given.start.numpy() - D @ omega.numpy()).max() < 1e-12 * scale
        assert np.abs(given.probes.numpy() - D @ drawn[shape.d_in].numpy()).max() < 1e-12 * scale
        assert 0 < given.rounding < 1e-10 * scale
        assert rel_err(got.dense(name), reference.truncate(D, R)) < 1e-10


def test_sketches_from_a_round_hide_nothing_from_probes_drawn_before_it() -> None:
    """The planted round again, its products accumulated before the close: with probes the
    uploads could not know, the hidden top direction is caught; probes built from the public
    Ω would have let the sketch "certify" a wrong σ₁."""
    k = 4 + lowrank.OVERSAMPLE
    t = planted_round(pieces=k, hidden_from=k)
    W = sum((p.B @ p.A for p in t), torch.zeros(96, 96, dtype=torch.float64))
    omega = lowrank.sketch_start(96, k, torch.float64, "cpu")
    secret = lowrank.secret_probes(96, torch.float64, "cpu")
    assert (
        randomized_svd_dense(W, 4, widen=False, given=lowrank.Sketched(W @ omega, W @ secret, 0.0))
        is None
    )
    public = omega[:, : lowrank.PROBES] if k >= lowrank.PROBES else omega
    fooled = randomized_svd_dense(
        W, 4, widen=False, given=lowrank.Sketched(W @ omega, W @ public, 0.0)
    )
    assert fooled is not None and float(fooled.S[0]) < 1.05
    found = lowrank.truncated_svd_of_sum(
        t, 4, SvdMethod.RANDOMIZED, given=lowrank.Sketched(W @ omega, W @ secret, 0.0)
    )
    assert float(found.S[0]) == pytest.approx(1.1)


def test_a_top_direction_the_dense_sketch_cannot_see_is_caught() -> None:
    """The planted round of tests/test_lowrank.py, held densely: the fixed Ω misses the top
    direction, the secret probes catch it, and the close publishes σ₁ = 1.1."""
    t = planted_round(pieces=4 + lowrank.OVERSAMPLE, hidden_from=4 + lowrank.OVERSAMPLE)
    W = sum((p.B @ p.A for p in t), torch.zeros(96, 96, dtype=torch.float64))
    assert randomized_svd_dense(W, 4, widen=False) is None
    found = truncated_svd_of_dense(W, 4, SvdMethod.RANDOMIZED)
    want = np.linalg.svd(W.numpy(), compute_uv=False)[:4]
    assert float(found.S[0]) == pytest.approx(1.1)
    assert np.allclose(found.S.numpy(), want, rtol=1e-9)


def test_dense_randomized_path_matches_lapack_and_respects_the_rank_bound() -> None:
    g = torch.Generator().manual_seed(11)
    d, rank = 200, 40
    U, _ = torch.linalg.qr(torch.randn(d, rank, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(d, rank, generator=g, dtype=torch.float64))
    sigma = torch.logspace(0, -3, rank, dtype=torch.float64)
    W = (U * sigma) @ V.T
    fast = randomized_svd_dense(W, R)
    assert fast is not None
    assert torch.allclose(fast.S, sigma[:R], rtol=1e-9)
    few = truncated_svd_of_dense(W[:, :] * 0 + (U[:, :3] * sigma[:3]) @ V[:, :3].T, R, rank_bound=3)
    assert few.rank == 3
    state = GlobalState(0, {"m": few})
    assert rel_err(state.dense("m"), (U[:, :3] * sigma[:3]) @ V[:, :3].T) < 1e-10


def test_uploads_in_another_dtype_are_counted_as_the_copies_they_need(
    schema: AdapterSchema,
) -> None:
    updates = random_updates(schema, CLIENTS[:1], dtype=torch.float16)
    strategy = make_strategy("raflora", StrategyConfig(schema=schema, max_rank=R))
    sums = RoundSums(strategy, strategy.initial_state())
    elements = sum(f.B.numel() + f.A.numel() for f in updates[0].factors.values())
    assert sums.copy_bytes(updates[0]) == 4 * elements  # an fp32 copy of every factor
    native = random_updates(schema, CLIENTS[:1], dtype=torch.float32)
    assert sums.copy_bytes(native[0]) == 0  # kept by reference
