"""The one owner of the round manifest's schema: what a published round records.

A manifest is read back from disk, so :meth:`RoundManifest.from_json` treats it as hostile:
every field is type-checked and a malformed one raises :class:`ManifestError`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from raflora.server.engine import RankEnergy
from raflora.server.engine.accountant import DpRound, history_from_json, history_to_json

SCHEMA_VERSION = 2
Holders = tuple[int, int, float]  # (partition upper rank, holder count, holder weight share)


class ManifestError(ValueError):
    """A manifest on disk that does not follow the schema."""


@dataclass(frozen=True)
class ManifestUpload:
    client_id: str
    rank: int
    num_examples: int
    scale: float
    sha256: str
    weight_share: float  # the client's normalised weight p_i in this round
    clip: float = 1.0  # the factor its update was clipped by (robust policy; 1: none)
    trust: float = 1.0  # the factor its weight was multiplied by (robust policy; 1: none)


@dataclass(frozen=True)
class ManifestPrivacy:
    """A private round's mechanism and the federation's privacy spent up to it (§2.9)."""

    noise_multiplier: float
    clip_norm: float
    delta: float
    noise_std: float
    denominator: int  # m̄, the round's seats
    sample: int  # what the accountant saw: `sample` of `roster` drawn (equal: no amplification)
    roster: int
    epsilon: float  # after this round, at delta
    history: tuple[tuple[DpRound, int], ...]  # every private round so far, as a histogram

    @property
    def rounds(self) -> int:
        return sum(count for _, count in self.history)

    def to_json(self) -> dict[str, Any]:
        return {
            "noise_multiplier": self.noise_multiplier,
            "clip_norm": self.clip_norm,
            "delta": self.delta,
            "noise_std": self.noise_std,
            "denominator": self.denominator,
            "sample": self.sample,
            "roster": self.roster,
            "epsilon": self.epsilon,
            "history": history_to_json(dict(self.history)),
        }

    @classmethod
    def from_json(cls, raw: Any) -> ManifestPrivacy:
        if not isinstance(raw, Mapping):
            raise TypeError("privacy is not a JSON object")
        out = cls(
            noise_multiplier=_num(raw["noise_multiplier"]),
            clip_norm=_num(raw["clip_norm"]),
            delta=_num(raw["delta"]),
            noise_std=_num(raw["noise_std"]),
            denominator=_int(raw["denominator"]),
            sample=_int(raw["sample"]),
            roster=_int(raw["roster"]),
            epsilon=_num(raw["epsilon"]),
            history=tuple(sorted(history_from_json(_list(raw["history"])).items())),
        )
        bad = [
            name
            for name, value in (
                ("noise_multiplier", out.noise_multiplier),
                ("clip_norm", out.clip_norm),
                ("noise_std", out.noise_std),
            )
            if not (math.isfinite(value) and value > 0)
        ]
        if bad or not 0 < out.delta < 1 or not out.epsilon >= 0 or out.denominator < 1:
            raise ValueError(f"privacy record out of range ({', '.join(bad) or 'delta/epsilon'})")
        return out


@dataclass(frozen=True)
class RoundManifest:
    federation_id: str
    round: int
    strategy: str
    uploads: tuple[ManifestUpload, ...]
    energy: RankEnergy
    holders: tuple[Holders, ...]
    participant_ranks: tuple[int, ...]
    published_unix: float
    state_sha256: str = ""  # filled in by the store when the state file is written
    state_bytes: int = 0
    quarantined: tuple[str, ...] = ()  # client ids removed from the round before aggregating
    privacy: ManifestPrivacy | None = None  # set for a private federation's rounds

    @property
    def max_weight_share(self) -> float:
        return max((u.weight_share for u in self.uploads), default=0.0)

    def to_json(self) -> dict[str, Any]:
        e = self.energy
        return {
            "schema_version": SCHEMA_VERSION,
            "federation_id": self.federation_id,
            "round": self.round,
            "strategy": self.strategy,
            "uploads": [
                {
                    "client_id": u.client_id,
                    "rank": u.rank,
                    "num_examples": u.num_examples,
                    "scale": u.scale,
                    "sha256": u.sha256,
                    "weight_share": u.weight_share,
                    "clip": u.clip,
                    "trust": u.trust,
                }
                for u in self.uploads
            ],
            "energy": {
                "partition_upper_ranks": list(e.boundaries),
                "partition_energy": [_finite_or_none(v) for v in e.partition_energy],
                "tail_energy": _finite_or_none(e.tail_energy),
                "e_min": _finite_or_none(e.e_min),
                "effective_rank": _finite_or_none(e.effective_rank),
                "total_energy": _finite_or_none(e.total_energy),
            },
            "partition_holders": [list(h) for h in self.holders],
            "participant_ranks": list(self.participant_ranks),
            "published_unix": self.published_unix,
            "state_sha256": self.state_sha256,
            "state_bytes": self.state_bytes,
            "quarantined": list(self.quarantined),
            **({"privacy": self.privacy.to_json()} if self.privacy is not None else {}),
        }

    @classmethod
    def from_json(cls, raw: Any) -> RoundManifest:
        try:
            return _parse(raw)
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"manifest does not follow the schema: {exc}") from None


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _num(value: Any) -> float:
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    return float(value)


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    return value


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError(f"expected a list, got {type(value).__name__}")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _parse(raw: Any) -> RoundManifest:
    if not isinstance(raw, Mapping):
        raise TypeError("manifest is not a JSON object")
    energy = raw["energy"]
    uploads = tuple(
        ManifestUpload(
            client_id=_str(u["client_id"]),
            rank=_int(u["rank"]),
            num_examples=_int(u["num_examples"]),
            scale=_num(u["scale"]),
            sha256=_str(u["sha256"]),
            weight_share=_num(u.get("weight_share", math.nan)),
            clip=_num(u.get("clip", 1.0)),
            trust=_num(u.get("trust", 1.0)),
        )
        for u in raw["uploads"]
    )
    return RoundManifest(
        federation_id=_str(raw["federation_id"]),
        round=_int(raw["round"]),
        strategy=_str(raw["strategy"]),
        uploads=uploads,
        energy=RankEnergy(
            boundaries=tuple(_int(b) for b in energy["partition_upper_ranks"]),
            partition_energy=tuple(_num(v) for v in energy["partition_energy"]),
            tail_energy=_num(energy.get("tail_energy", 0.0)),
            e_min=_num(energy["e_min"]),
            effective_rank=_num(energy["effective_rank"]),
            total_energy=_num(energy.get("total_energy")),
        ),
        holders=tuple((_int(r), _int(c), _num(w)) for r, c, w in raw["partition_holders"]),
        participant_ranks=tuple(_int(r) for r in raw["participant_ranks"]),
        published_unix=_num(raw["published_unix"]),
        state_sha256=_str(raw.get("state_sha256", "")),
        state_bytes=_int(raw.get("state_bytes", 0)),
        quarantined=tuple(_str(c) for c in raw.get("quarantined", ())),
        privacy=ManifestPrivacy.from_json(raw["privacy"]) if "privacy" in raw else None,
    )
