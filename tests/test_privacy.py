"""Client-level DP (docs/design.md §2.9): the mechanism against a dense NumPy reference, its
sensitivity as an attacker would probe it, the noise's scale, and the accountant against an
independent RDP computation and against the dp-accounting package's own composition."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from raflora.server.engine import (
    AdapterSchema,
    ClientUpdate,
    ConfigError,
    FactorPair,
    GlobalState,
    PrivacyPolicy,
    PrivateRound,
    Strategy,
    StrategyConfig,
    Weighting,
    make_strategy,
)
from raflora.server.engine.accountant import (
    DpRound,
    add_round,
    epsilon_spent,
    history_from_json,
    history_to_json,
    noise_multiplier_for,
)
from raflora.server.engine.privacy import noise_std
from raflora.server.engine.robust import RobustPolicy

from . import reference as ref
from .conftest import as_reference, random_updates, rel_err

SCHEMA = AdapterSchema.from_shapes({"q": (12, 10), "v": (9, 10)})
CLIENTS = [("a", 2, 1, 4.0), ("b", 2, 1, 8.0), ("c", 4, 1, 8.0), ("d", 8, 1, 16.0)]
FULL_RANK = 10  # max of min(d_out, d_in) over the modules: truncation keeps everything


def private(
    name: str = "raflora",
    z: float = 1.0,
    clip: float = 3.0,
    max_rank: int = 8,
    **options: object,
) -> Strategy:
    cfg = StrategyConfig(
        schema=SCHEMA,
        max_rank=max_rank,
        weighting=Weighting.UNIFORM,
        compute_dtype=torch.float64,
        options=options,
        privacy=PrivacyPolicy(noise_multiplier=z, clip_norm=clip),
    )
    return make_strategy(name, cfg)


def noise_like(seed: int, std: float) -> dict[str, np.ndarray]:
    """The engine's noise: one generator seeded per round, drawn module by module in order."""
    g = torch.Generator().manual_seed(seed)
    return {
        m: (torch.randn((s.d_out, s.d_in), generator=g, dtype=torch.float64) * std).numpy()
        for m, s in SCHEMA.modules.items()
    }


def dense(state: GlobalState, m: str) -> np.ndarray:
    return np.asarray(state.modules[m].dense().double().numpy())


@pytest.mark.parametrize("clip", [0.5, 3.0, 1e6])  # binding for all, for some, for none
def test_private_raflora_matches_the_dense_reference(clip: float) -> None:
    s = private(clip=clip, max_rank=8)
    updates = random_updates(SCHEMA, CLIENTS, seed=5)
    mbar, seed = 5, 1234  # one selected client did not push: the denominator stays 5
    out = s.aggregate(s.initial_state(), updates, PrivateRound(mbar, seed))
    std = 1.0 * 2 * clip / mbar
    expected = ref.private_raflora(
        as_reference(updates), list(SCHEMA), 8, clip, mbar, noise_like(seed, std)
    )
    for m in SCHEMA:
        assert rel_err(dense(out, m), expected[m]) < 1e-10
    assert out.privacy is not None and out.privacy.noise_std == pytest.approx(std)
    clipped = [c < 1 for c in out.privacy.clip]
    assert any(clipped) == (clip < 1e6)


def test_without_clipping_or_dropouts_the_mechanism_is_the_strategy_plus_noise() -> None:
    """z → tiny, C huge, m̄ = n: the private aggregate is raflora_ha's own (uniform weights)."""
    updates = random_updates(SCHEMA, CLIENTS, seed=2)
    s = private("raflora_ha", z=1e-12, clip=1e4)
    plain = make_strategy(
        "raflora_ha",
        StrategyConfig(
            schema=SCHEMA, max_rank=8, weighting=Weighting.UNIFORM, compute_dtype=torch.float64
        ),
    )
    a = s.aggregate(s.initial_state(), updates, PrivateRound(len(updates), 7))
    b = plain.aggregate(plain.initial_state(), updates)
    for m in SCHEMA:
        assert rel_err(dense(a, m), dense(b, m)) < 1e-6


def attacked(updates: list[ClientUpdate], who: int, gain: float | None) -> list[ClientUpdate]:
    """Client ``who``'s update times ``gain``; gain None: fresh data of the same rank."""
    u = updates[who]
    if gain is None:
        fresh = random_updates(SCHEMA, [(u.client_id, u.rank, 1, 8.0)], seed=77)[0]
        factors = {m: FactorPair(B=f.B * 30, A=f.A) for m, f in fresh.factors.items()}
    else:
        factors = {m: FactorPair(B=f.B * gain, A=f.A) for m, f in u.factors.items()}
    return [
        *updates[:who],
        ClientUpdate(u.client_id, u.rank, u.num_examples, u.scale, factors),
        *updates[who + 1 :],
    ]


@pytest.mark.parametrize("who", [0, 3])  # a low-rank client; the lone high-rank holder
@pytest.mark.parametrize("gain", [-1000.0, 0.0, None])
def test_one_client_moves_the_release_by_at_most_the_sensitivity(
    who: int, gain: float | None
) -> None:
    """Same noise seed, one client's data replaced by anything: at full rank the releases
    differ by ≤ 2C/m̄ in Frobenius norm over all modules — the bound σ is calibrated to."""
    clip, mbar = 2.0, 4
    s = private("raflora", clip=clip, max_rank=FULL_RANK)
    honest = random_updates(SCHEMA, CLIENTS, seed=9)
    a = s.aggregate(s.initial_state(), honest, PrivateRound(mbar, 99))
    b = s.aggregate(s.initial_state(), attacked(honest, who, gain), PrivateRound(mbar, 99))
    moved = math.sqrt(sum(float(np.sum((dense(a, m) - dense(b, m)) ** 2)) for m in SCHEMA))
    assert moved <= 2 * clip / mbar * (1 + 1e-9)
    assert moved > 0.05 * clip / mbar  # it did move: the bound is not vacuous


def test_noise_has_the_calibrated_scale() -> None:
    """Zero updates at full rank: the release is the noise; its entries' std is σ = 2zC/m̄."""
    zero = [
        ClientUpdate(
            f"c{i}",
            2,
            1,
            1.0,
            {
                m: FactorPair(
                    torch.zeros(s.d_out, 2, dtype=torch.float64),
                    torch.zeros(2, s.d_in, dtype=torch.float64),
                )
                for m, s in SCHEMA.modules.items()
            },
        )
        for i in range(3)
    ]
    s = private("flexlora", z=1.5, clip=4.0, max_rank=FULL_RANK)
    values = []
    for seed in range(40):
        out = s.aggregate(s.initial_state(), zero, PrivateRound(3, seed))
        values += [dense(out, "q").ravel()]
    sample = np.concatenate(values)
    sigma = 1.5 * 2 * 4.0 / 3
    assert noise_std(PrivacyPolicy(1.5, 4.0), 3) == pytest.approx(sigma)
    assert abs(sample.std() / sigma - 1) < 0.03  # 4800 draws: 3% is > 5 standard errors
    assert abs(sample.mean()) < 0.05 * sigma


def test_fresh_seeds_give_fresh_noise() -> None:
    s = private()
    updates = random_updates(SCHEMA, CLIENTS, seed=1)
    a = s.aggregate(s.initial_state(), updates, PrivateRound(4, 1))
    b = s.aggregate(s.initial_state(), updates, PrivateRound(4, 2))
    assert rel_err(dense(a, "q"), dense(b, "q")) > 0.1


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"weighting": Weighting.EXAMPLES}, "weighting"),
        ({"robust": RobustPolicy(clip_quantile=0.5)}, "robust"),
    ],
)
def test_private_configs_refuse_data_dependent_weights(
    kwargs: dict[str, object], field: str
) -> None:
    base: dict[str, object] = {
        "schema": SCHEMA,
        "max_rank": 8,
        "weighting": Weighting.UNIFORM,
        "privacy": PrivacyPolicy(1.0, 1.0),
    }
    with pytest.raises(ConfigError) as exc:
        StrategyConfig(**{**base, **kwargs})  # type: ignore[arg-type]
    assert exc.value.field == field


@pytest.mark.parametrize("name", ["hetlora", "rbla", "flora"])
def test_strategies_without_a_mechanism_refuse_privacy(name: str) -> None:
    with pytest.raises(ConfigError) as exc:
        private(name)
    assert exc.value.field == "privacy"


def test_a_private_round_needs_its_terms() -> None:
    s = private()
    with pytest.raises(ConfigError):
        s.aggregate(s.initial_state(), random_updates(SCHEMA, CLIENTS))


@pytest.mark.parametrize(
    ("z", "clip", "field"),
    [
        (1.0, 0.0, "privacy.clip_norm"),
        (0.0, 1.0, "privacy.noise_multiplier"),
        (math.inf, 1.0, "privacy.noise_multiplier"),
    ],
)
def test_policy_needs_both_bounds(z: float, clip: float, field: str) -> None:
    with pytest.raises(ConfigError) as exc:
        PrivacyPolicy(z, clip)
    assert exc.value.field == field


# -- the accountant --------------------------------------------------------------------------
def classic_rdp_epsilon(z: float, rounds: int, delta: float) -> float:
    """Independent: the Gaussian mechanism's RDP ε(α) = T·α / (2z²), converted to (ε, δ) by
    the bound of Canonne, Kamath & Steinke (2020) that dp-accounting uses, minimised over a
    fine continuous grid of orders (the package uses a fixed list, so it can only be ≥)."""
    alphas = np.linspace(1.01, 400, 400_000)
    rdp = rounds * alphas / (2 * z**2)
    eps = rdp + np.log1p(-1 / alphas) - (np.log(delta) + np.log(alphas)) / (alphas - 1)
    return float(eps.min())


@pytest.mark.parametrize(("z", "rounds"), [(0.8, 5), (1.0, 20), (3.0, 100)])
def test_unsampled_epsilon_matches_an_independent_rdp_computation(z: float, rounds: int) -> None:
    ours = epsilon_spent({DpRound.unamplified(z): rounds}, 1e-5)
    independent = classic_rdp_epsilon(z, rounds, 1e-5)
    assert independent <= ours * (1 + 1e-9)
    assert ours <= independent * 1.02  # the package's order grid costs < 2%


def test_the_federations_epsilon_is_the_packages_own_composition() -> None:
    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant as rdp

    history: dict[DpRound, int] = {}
    rounds = [DpRound(1.1, 3, 8)] * 3 + [DpRound(1.1, 8, 8)] * 2 + [DpRound(2.0, 4, 9)]
    for event in rounds:
        history = add_round(history, event)
    direct = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    for event in rounds:  # one round at a time, in the order they ran
        if event.sample == event.roster:
            direct.compose(dp_accounting.GaussianDpEvent(event.noise_multiplier))
        else:
            direct.compose(
                dp_accounting.SampledWithoutReplacementDpEvent(
                    event.roster,
                    event.sample,
                    dp_accounting.GaussianDpEvent(event.noise_multiplier),
                )
            )
    assert epsilon_spent(history, 1e-6) == pytest.approx(direct.get_epsilon(1e-6), rel=1e-9)


def test_sampling_amplifies_and_more_rounds_spend_more() -> None:
    full = epsilon_spent({DpRound.unamplified(1.0): 5}, 1e-5)
    sampled = epsilon_spent({DpRound(1.0, 2, 12): 5}, 1e-5)
    assert sampled < 0.5 * full
    assert epsilon_spent({DpRound.unamplified(1.0): 6}, 1e-5) > full
    assert epsilon_spent({}, 1e-5) == 0.0


def test_calibration_finds_the_smallest_noise_for_a_budget() -> None:
    z = noise_multiplier_for(8.0, 1e-5, rounds=5)
    assert epsilon_spent({DpRound.unamplified(z): 5}, 1e-5) <= 8.0
    assert epsilon_spent({DpRound.unamplified(z * 0.999): 5}, 1e-5) > 8.0


def test_history_survives_json_and_refuses_garbage() -> None:
    history = add_round(add_round({}, DpRound(1.5, 2, 6)), DpRound.unamplified(1.5))
    history = add_round(history, DpRound(1.5, 2, 6))
    assert history_from_json(history_to_json(history)) == history
    for bad in (
        [[1.0, 3, 2, 1]],
        [[1.0, 1, 1]],
        [["x", 1, 1, 1]],
        [[1.0, 1, 1, -1]],
        [[-1.0, 1, 1, 1]],
        [[1.0, True, 1, 1]],
    ):
        with pytest.raises(ValueError):
            history_from_json(bad)


def test_the_manifest_privacy_record_round_trips_and_refuses_garbage() -> None:
    """What resume recomposes ε from is read back from disk: hostile until checked."""
    from raflora.server.storage import ManifestError, ManifestPrivacy

    history = tuple(
        sorted(add_round(add_round({}, DpRound(1.2, 3, 6)), DpRound(1.2, 3, 6)).items())
    )
    record = ManifestPrivacy(1.2, 2.0, 1e-5, 0.8, 3, 3, 6, 4.2, history)
    assert ManifestPrivacy.from_json(json.loads(json.dumps(record.to_json()))) == record
    assert record.rounds == 2
    good = record.to_json()
    for field, value in (
        ("noise_multiplier", 0.0),
        ("clip_norm", float("nan")),
        ("delta", 1.0),
        ("epsilon", -1.0),
        ("denominator", 0),
        ("history", [[1.2, 7, 6, 1]]),
        ("history", "x"),
        ("sample", 2.5),
    ):
        with pytest.raises((ValueError, TypeError)):
            ManifestPrivacy.from_json({**good, field: value})
    from raflora.server.engine import RankEnergy
    from raflora.server.storage import RoundManifest

    energy = RankEnergy((2,), (1.0,), 0.0, 1.0, 1.0, 1.0)
    manifest = RoundManifest("f", 2, "raflora", (), energy, (), (), 0.0, privacy=record)
    raw = json.loads(json.dumps(manifest.to_json()))
    assert RoundManifest.from_json(raw).privacy == record
    with pytest.raises(ManifestError):
        RoundManifest.from_json({**raw, "privacy": {**good, "delta": 2}})


def test_the_calibration_command(capsys: pytest.CaptureFixture[str]) -> None:
    from raflora.server.calibrate import main

    assert main(["--epsilon", "8", "--rounds", "5", "--clip-norm", "2", "--clients", "6"]) == 0
    out = capsys.readouterr().out
    z = noise_multiplier_for(8.0, 1e-5, 5)
    assert f"noise_multiplier = {z:.6g}" in out
    assert f"= {z * 4 / 6:.6g}" in out
    assert main(["--epsilon", "-1", "--rounds", "5"]) == 2
    assert "epsilon > 0" in capsys.readouterr().err


def test_a_crafted_cancelling_update_cannot_slip_past_the_clip() -> None:
    """B = [b, b], A = [a; −a + δ]: ‖B A‖ is small next to ‖B‖‖A‖, where a float32 Gram sum
    cancels (to 0 or below). The norm is taken in float64, so the clip still binds: at full
    rank, replacing the client by this update moves the release by ≤ 2C/m̄."""
    shapes = {"q": (12, 10)}
    schema = AdapterSchema.from_shapes(shapes)
    g = torch.Generator().manual_seed(4)
    b, a, d = (
        torch.randn(12, generator=g),
        torch.randn(10, generator=g),
        torch.randn(10, generator=g),
    )
    crafted = FactorPair(B=torch.stack([b, b], 1) * 60, A=torch.stack([a * 40, -a * 40 + 0.01 * d]))
    exact = float(torch.linalg.norm(crafted.B.double() @ crafted.A.double()))
    cfg = StrategyConfig(
        schema=schema,
        max_rank=10,
        weighting=Weighting.UNIFORM,
        privacy=PrivacyPolicy(noise_multiplier=1.0, clip_norm=1e-3 * exact),
    )  # float32 compute, as in the service
    s = make_strategy("flexlora", cfg)
    honest = ClientUpdate("h", 2, 1, 1.0, {"q": FactorPair(torch.zeros(12, 2), torch.zeros(2, 10))})
    attacker = ClientUpdate("x", 2, 1, 1.0, {"q": crafted})
    out = s.aggregate(s.initial_state(), [honest, attacker], PrivateRound(2, 5))
    assert out.privacy is not None
    assert out.privacy.norms[1] == pytest.approx(exact, rel=1e-3)
    assert out.privacy.clip[1] == pytest.approx(1e-3, rel=1e-2)
    other = ClientUpdate("x", 2, 1, 1.0, honest.factors)
    base = s.aggregate(s.initial_state(), [honest, other], PrivateRound(2, 5))
    moved = float(
        torch.linalg.norm(out.modules["q"].dense().double() - base.modules["q"].dense().double())
    )
    assert moved <= 2 * cfg.privacy.clip_norm / 2 * 1.01
