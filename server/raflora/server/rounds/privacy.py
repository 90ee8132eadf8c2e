"""A private round's terms, fixed when it closes, and its record once published (§2.9).

The denominator and the accountant's view of the draw are decided from the round's selection
before any upload is read; the noise seed is drawn here from the OS's CSPRNG, handed to the
engine, and never stored or logged: whoever knows it can subtract the noise.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from raflora.server.engine import GlobalState
from raflora.server.engine.accountant import DpRound, add_round, epsilon_spent
from raflora.server.engine.privacy import PrivateRound

from ..config import FederationConfig
from ..storage import ManifestPrivacy, RoundManifest
from .selection import Selection


@dataclass(frozen=True)
class RoundPrivacy:
    mechanism: PrivateRound
    event: DpRound
    history: dict[DpRound, int]  # the federation's private rounds before this one
    delta: float


def round_privacy(
    config: FederationConfig,
    selection: Selection | None,
    quota: int,
    previous: RoundManifest | None,
) -> RoundPrivacy | None:
    """The mechanism of the round that closes now, or None for a federation without DP.

    Only a uniform draw (rng.sample of ``seats`` among more candidates) amplifies privacy;
    everything else is accounted as if everyone took part.
    """
    if not config.privacy.active:
        return None
    z = config.privacy.noise_multiplier
    if selection is not None and selection.uniform:
        event = DpRound(z, selection.seats, selection.roster)
    else:
        event = DpRound.unamplified(z)
    spent = previous.privacy if previous is not None else None
    history = dict(spent.history) if spent is not None else {}
    return RoundPrivacy(
        mechanism=PrivateRound(denominator=quota, noise_seed=secrets.randbits(63)),
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
