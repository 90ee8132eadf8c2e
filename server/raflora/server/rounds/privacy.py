"""A private round's terms, fixed when it closes, and its record once published (§2.9).

The denominator is decided from the round's quota before any upload is read; the noise seed
is drawn here from the OS's CSPRNG, handed to the engine, and never stored or logged: whoever
knows it can subtract the noise.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field

from raflora.server.engine import GlobalState
from raflora.server.engine.accountant import DpRound, add_round, epsilon_spent
from raflora.server.engine.privacy import PrivateRound

from ..config import FederationConfig
from ..storage import ManifestPrivacy, RoundManifest


@dataclass(frozen=True)
class RoundPrivacy:
    mechanism: PrivateRound = field(repr=False)  # holds the noise seed
    event: DpRound
    history: dict[DpRound, int]  # the federation's private rounds before this one
    delta: float


def round_privacy(
    config: FederationConfig, denominator: int, previous: RoundManifest | None
) -> RoundPrivacy | None:
    """The mechanism of the round that closes now, or None for a federation without DP.

    Every round is accounted without amplification by sampling: the participation draw is
    reproducible from the policy's seed, which is in the federation's spec, so who takes part
    is no secret from an adversary and subsampling amplifies nothing (docs/design.md §2.9).
    """
    if not config.privacy.active:
        return None
    event = DpRound.unamplified(config.privacy.noise_multiplier)
    spent = previous.privacy if previous is not None else None
    history = dict(spent.history) if spent is not None else {}
    return RoundPrivacy(
        mechanism=PrivateRound(denominator=denominator, noise_seed=secrets.randbits(63)),
        event=event,
        history=history,
        delta=config.privacy.delta,
    )


def manifest_privacy(terms: RoundPrivacy, state: GlobalState) -> ManifestPrivacy:
    """The published round's record: its mechanism and ε after it."""
    outcome = state.privacy
    assert outcome is not None, "a private round's state records its mechanism"
    history = add_round(terms.history, terms.event)
    return ManifestPrivacy(
        noise_multiplier=outcome.noise_multiplier,
        clip_norm=outcome.clip_norm,
        delta=terms.delta,
        noise_std=outcome.noise_std,
        denominator=outcome.denominator,
        sample=terms.event.sample,
        roster=terms.event.roster,
        epsilon=epsilon_spent(history, terms.delta),
        history=tuple(sorted(history.items())),
    )


def privacy_record_problem(
    config: FederationConfig, spent: ManifestPrivacy | None, latest: int
) -> str:
    """Why the newest manifest's privacy record cannot be trusted ("" when it can).

    ε is recomposed from the history on disk, so a record that lost rounds, names another
    mechanism than the federation's, or states an ε its own history does not give would
    under-report what was spent.
    """
    if spent is None:
        return "it has no privacy record"
    if spent.rounds != latest:
        return f"its privacy record counts {spent.rounds} rounds"
    policy = config.privacy
    if spent.delta != policy.delta or any(
        e.noise_multiplier != policy.noise_multiplier for e, _ in spent.history
    ):
        return "its privacy record names another noise multiplier or delta"
    recomputed = epsilon_spent(dict(spent.history), policy.delta)
    if not math.isclose(spent.epsilon, recomputed, rel_tol=1e-9, abs_tol=1e-12):
        return (
            f"its privacy record states epsilon {spent.epsilon:g}, its history gives {recomputed:g}"
        )
    return ""
