"""One round's aggregation job: load → aggregate → energy/holders → a RoundManifest.

Runs in the aggregation thread. No upload can wedge a federation: one whose stored bytes no
longer match their digest, or that makes the aggregation fail on its own, is quarantined (kept
for inspection, removed from the round) and the round goes on with the rest.

After a publication, :func:`apply_retention` drops the published rounds beyond the
federation's ``keep_rounds`` (on the event loop, with the store calls in threads).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import torch

from raflora.server.engine import (
    AggregationError,
    ClientUpdate,
    GlobalState,
    ModuleMap,
    Strategy,
    Weighting,
    adapter_energy,
    client_weights,
    partition_holders,
)

from ..config import FederationConfig
from ..storage import CorruptDataError, FederationStore, ManifestUpload, RoundManifest, UploadRecord
from .folding import RoundFolder
from .preload import RoundPreload
from .privacy import RoundPrivacy, manifest_privacy
from .published import PublishedRounds
from .views import ViewCache

log = logging.getLogger("raflora.server")

# Shares become integer example counts for the engine; this resolution keeps them exact to
# ~1e-12 relative.
_SHARE_RESOLUTION = 1 << 40


def capped_shares(num_examples: Sequence[int], weighting: Weighting, cap: float) -> list[float]:
    """Normalised client weights with no share above ``cap`` (water-filling).

    Shares above the cap are clipped to it and the excess is spread over the others in
    proportion to their weights, repeatedly; when ``n · cap < 1`` no share can respect the cap
    and everyone gets ``1/n``.
    """
    p = [float(v) for v in client_weights(list(num_examples), weighting).tolist()]
    n = len(p)
    if cap >= 1.0 or n == 0:
        return p
    if n * cap <= 1.0:
        return [1.0 / n] * n
    fixed: set[int] = set()
    while True:
        free = [i for i in range(n) if i not in fixed]
        budget = 1.0 - cap * len(fixed)
        mass = sum(p[i] for i in free)
        shares = [cap if i in fixed else budget * p[i] / mass for i in range(n)]
        over = [i for i in free if shares[i] > cap * (1 + 1e-12)]
        if not over:
            return shares
        fixed.update(over)


@dataclass(frozen=True)
class Quarantined:
    record: UploadRecord
    reason: str


@dataclass(frozen=True)
class PublishOutcome:
    state: GlobalState
    manifest: RoundManifest
    quarantined: tuple[Quarantined, ...]
    folded: bool = False  # aggregated from the uploads folded as they arrived
    summed: bool = False  # aggregated from the round's sums (rounds/summing.py)


class NothingToAggregateError(Exception):
    """Every upload of the round was quarantined."""

    def __init__(self, quarantined: Sequence[Quarantined]) -> None:
        super().__init__(f"all {len(quarantined)} uploads of the round were quarantined")
        self.quarantined = tuple(quarantined)


class RoundPublisher:
    def __init__(
        self,
        config: FederationConfig,
        strategy: Strategy,
        store: FederationStore,
        published: PublishedRounds | None = None,
        map_modules: ModuleMap | None = None,
    ) -> None:
        self.config = config
        self.strategy = strategy
        self.store = store
        self.published = published
        self.map_modules = map_modules  # None: every module here, one by one

    def load(
        self, records: Sequence[UploadRecord], preload: RoundPreload | None = None
    ) -> tuple[list[ClientUpdate], list[Quarantined]]:
        """Every upload, checked against its digest (read back now, or already by
        ``preload``); corrupt ones are set aside."""
        good: list[ClientUpdate] = []
        bad: list[Quarantined] = []
        for record in records:
            try:
                factors = preload.take(record) if preload is not None else None
                if factors is None:
                    factors = self.store.read_upload(record, self.strategy.schema)
            except (CorruptDataError, AggregationError) as exc:
                bad.append(Quarantined(record, str(exc)))
                continue
            good.append(
                ClientUpdate(
                    record.client_id, record.rank, record.num_examples, record.scale, factors
                )
            )
        return good, bad

    def shares(self, examples: Sequence[int]) -> list[float]:
        return capped_shares(examples, self.config.weighting, self.config.max_weight_share)

    def weighted(
        self, updates: Sequence[ClientUpdate], shares: Sequence[float]
    ) -> list[ClientUpdate]:
        """The updates with the influence cap applied to the clients actually aggregated."""
        if self.config.max_weight_share >= 1.0:  # the engine weighs the examples exactly
            return list(updates)
        return [
            ClientUpdate(
                u.client_id, u.rank, max(1, round(p * _SHARE_RESOLUTION)), u.scale, u.factors
            )
            for u, p in zip(updates, shares, strict=True)
        ]

    def aggregate(
        self,
        updates: list[ClientUpdate],
        records: Mapping[str, UploadRecord],
        combine: Callable[[list[ClientUpdate]], GlobalState],
        alone: Callable[[list[ClientUpdate]], GlobalState] | None = None,
    ) -> tuple[GlobalState | None, list[ClientUpdate], list[float], list[Quarantined]]:
        """Aggregate with ``combine``; if that fails, set aside the uploads that fail alone
        (tried with ``alone``, default ``combine``) and retry. Returns the new state, the
        updates in it with their shares, and the culprits.
        """
        alone = alone or combine
        culprits: list[Quarantined] = []
        while updates:
            shares = self.shares([u.num_examples for u in updates])
            try:
                weighted = self.weighted(updates, shares)
                new_state = combine(weighted)
                return new_state, updates, shares, culprits
            except Exception as exc:
                first_error = exc
            found = []
            for u in updates:
                try:  # never released: a private trial costs no privacy
                    alone([u])
                except Exception as exc:
                    reason = f"aggregation failed on it: {exc}"
                    found.append(Quarantined(records[u.client_id], reason))
            if not found:  # the round as a whole fails: not any single upload's doing
                raise first_error
            culprits += found
            names = {q.record.client_id for q in found}
            updates = [u for u in updates if u.client_id not in names]
        return None, [], [], culprits

    def run(
        self,
        state: GlobalState,
        records: Sequence[UploadRecord],
        before_commit: Callable[[], None] | None = None,
        privacy: RoundPrivacy | None = None,
        folder: RoundFolder | None = None,
        preload: RoundPreload | None = None,
    ) -> PublishOutcome:
        """Aggregate and publish one round; with ``folder``, from its folded uploads if it has
        every one of them (else the uploads are read back, as without it, or taken from
        ``preload`` where it read them already)."""
        by_client = {r.client_id: r for r in records}
        outcome = self._from_folded(state, records, by_client, folder)
        new_state: GlobalState | None
        summed = False
        if outcome is None and privacy is None and preload is not None:
            outcome = self._from_sums(state, records, preload)
            summed = outcome is not None
        if outcome is not None:
            new_state, used, shares, quarantined = outcome
            folded = not summed
        else:
            updates, quarantined = self.load(records, preload)
            mechanism = privacy.mechanism if privacy is not None else None
            new_state, used, shares, culprits = self.aggregate(
                updates,
                by_client,
                lambda some: self.strategy.aggregate(
                    state, some, mechanism, map_modules=self.map_modules
                ),
                # Which upload is at fault is decided here, never by a remote cluster.
                lambda one: self.strategy.aggregate(state, one, mechanism),
            )
            quarantined += culprits
            folded = False
        if new_state is None:
            raise NothingToAggregateError(quarantined)
        used_records = [by_client[u.client_id] for u in used]
        if len(new_state.weights) == len(used):  # what the engine used, robust policy included
            shares = list(new_state.weights)
        clip = new_state.clip or (1.0,) * len(used)
        trust = new_state.trust or (1.0,) * len(used)
        energy = adapter_energy(new_state).overall
        p = torch.tensor(shares, dtype=torch.float64)
        holders = tuple(partition_holders([r.rank for r in used_records], p))
        manifest = RoundManifest(
            federation_id=self.config.federation_id,
            round=new_state.round,
            strategy=self.config.strategy,
            uploads=tuple(
                ManifestUpload(r.client_id, r.rank, r.num_examples, r.scale, r.sha256, *w)
                for r, *w in zip(used_records, shares, clip, trust, strict=True)
            ),
            energy=energy,
            holders=holders,
            participant_ranks=new_state.participant_ranks,
            published_unix=time.time(),
            quarantined=tuple(q.record.client_id for q in quarantined),
            privacy=manifest_privacy(privacy, new_state) if privacy is not None else None,
        )
        # Set the culprits aside before the publication: a crash in between re-runs the round
        # without them instead of failing on them again.
        for q in quarantined:
            self.store.quarantine_upload(q.record, q.reason)
        stored = self.store.publish(new_state, manifest, before_commit=before_commit)
        if stored.published_unix != manifest.published_unix and self.published is not None:
            # The round was already on disk (a retry after a commit whose fsync failed): what
            # is stored was released, so serve that, not this second (for DP: second noise) draw.
            new_state, stored = self.published.load(new_state.round)
        return PublishOutcome(new_state, stored, tuple(quarantined), folded, summed)

    def _from_sums(
        self, state: GlobalState, records: Sequence[UploadRecord], preload: RoundPreload
    ) -> tuple[GlobalState, list[ClientUpdate], list[float], list[Quarantined]] | None:
        """The round from the sums of its uploads (rounds/summing.py); None (the one-shot path
        decides) unless every upload was summed and the sums are the cheaper close."""
        updates = []
        for r in records:  # waits for each parse, and with it each upload's addition
            factors = preload.take(r)
            if factors is None:
                return None
            updates.append(ClientUpdate(r.client_id, r.rank, r.num_examples, r.scale, factors))
        sums = preload.summed(state, records)
        if sums is None or not sums.pays():
            return None
        shares = self.shares([u.num_examples for u in updates])
        try:
            new_state = sums.aggregate(state, self.weighted(updates, shares))
        except Exception as exc:  # e.g. an influence cap that binds: not a sum of the uploads
            log.info("round %d is aggregated one-shot, not from its sums: %s", state.round, exc)
            return None
        return new_state, updates, shares, []

    def _from_folded(
        self,
        state: GlobalState,
        records: Sequence[UploadRecord],
        by_client: Mapping[str, UploadRecord],
        folder: RoundFolder | None,
    ) -> tuple[GlobalState, list[ClientUpdate], list[float], list[Quarantined]] | None:
        """The round from its folded uploads; None (the one-shot path decides) if it has none
        or anything goes wrong there: only the one-shot path quarantines an upload."""
        if folder is None:
            return None
        try:
            folded = folder.take(state, records)
            if folded is None:
                return None
            updates = [folded.updates[r.client_id] for r in records]
            new_state, used, shares, culprits = self.aggregate(
                updates, by_client, folded.aggregation.aggregate
            )
        except Exception:
            log.warning("the folded close failed; the round is aggregated one-shot", exc_info=True)
            return None
        if new_state is None or culprits:
            names = ", ".join(q.record.client_id for q in culprits)
            log.warning(
                "the folded close failed on the uploads of %s; the round is aggregated one-shot",
                names,
            )
            return None
        return new_state, used, shares, []


def holder_warnings(manifest: RoundManifest, min_holders: int) -> tuple[str, ...]:
    """One warning per rank partition held by fewer than ``min_holders`` clients."""
    return tuple(
        f"rank partition {k} (indices up to {rho}) is held by {count} client(s) "
        f"with {share:.0%} of the round's weight; fewer than min_partition_holders={min_holders}"
        for k, (rho, count, share) in enumerate(manifest.holders, start=1)
        if count < min_holders
    )


def retention_victims(
    published: Sequence[int], keep: int, streaming: Collection[int] = ()
) -> list[int]:
    """The published rounds that ``keep_rounds = keep`` deletes: all but the newest ``keep``
    (0: none), never the newest, never one being streamed (a later publication takes it)."""
    if keep <= 0 or not published:
        return []
    rounds = sorted(set(published))
    older = rounds[: max(0, len(rounds) - max(keep, 1))]
    return [t for t in older if t not in streaming]


async def apply_retention(
    federation_id: str, store: FederationStore, views: ViewCache, keep: int
) -> list[int]:
    """Delete the rounds :func:`retention_victims` names; returns them.

    The views learn first (on the loop, atomically with the check of what is streaming), so
    a pull of a deleted round is NOT_FOUND even while its files are still being removed. A
    failure is logged: the publication it follows stands, and the next one tries again.
    """
    if keep <= 0:
        return []
    try:
        published = await asyncio.to_thread(store.published_rounds)
        victims = retention_victims(published, keep, [t for t in published if views.streaming(t)])
        views.retire(victims)
        for t in victims:
            await asyncio.to_thread(store.delete_round, t)
    except OSError as exc:
        log.error("federation %s: retention (keep_rounds=%d) failed: %s", federation_id, keep, exc)
        return []
    if victims:
        log.info(
            "federation %s: deleted published round(s) %s (keep_rounds=%d)",
            federation_id,
            ", ".join(map(str, victims)),
            keep,
        )
    return victims
