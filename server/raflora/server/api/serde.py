"""Every conversion between protobuf messages and the domain, in one place."""

from __future__ import annotations

from typing import Any

from raflora.server.engine import ConfigError, FactorSplit, RankEnergy, ScalingRule, Weighting
from raflora.v1 import aggregation_pb2 as pb

from ..config import FederationConfig
from ..rounds import EventType, FederationRuntime, Phase, PrivacyStatus, RoundEvent, Snapshot, View
from ..rounds.hub import ClientInfo
from ..rounds.tickets import PushOutcome
from ..rounds.views import LivePull
from ..storage.manifest import Holders
from ..storage.s3_direct import DownloadGrant, UploadGrant

_SCALING = {
    ScalingRule.STANDARD: pb.SCALING_RULE_STANDARD,
    ScalingRule.RSLORA: pb.SCALING_RULE_RSLORA,
}
_WEIGHTING = {Weighting.EXAMPLES: pb.WEIGHTING_EXAMPLES, Weighting.UNIFORM: pb.WEIGHTING_UNIFORM}
_SPLIT = {
    FactorSplit.ORTHONORMAL_A: pb.FACTOR_SPLIT_FLEXLORA,
    FactorSplit.BALANCED: pb.FACTOR_SPLIT_BALANCED,
}
_PHASES = {
    Phase.COLLECTING: pb.ROUND_PHASE_COLLECTING,
    Phase.AGGREGATING: pb.ROUND_PHASE_AGGREGATING,
}
_EVENTS = {
    EventType.STATUS: pb.ROUND_EVENT_TYPE_STATUS,
    EventType.UPLOAD: pb.ROUND_EVENT_TYPE_UPLOAD,
    EventType.AGGREGATING: pb.ROUND_EVENT_TYPE_AGGREGATING,
    EventType.PUBLISHED: pb.ROUND_EVENT_TYPE_PUBLISHED,
    EventType.FAILED: pb.ROUND_EVENT_TYPE_FAILED,
    EventType.QUARANTINED: pb.ROUND_EVENT_TYPE_QUARANTINED,
    EventType.SELECTED: pb.ROUND_EVENT_TYPE_SELECTED,
}
_DATA_PLANES = {"grpc": pb.DATA_PLANE_GRPC, "direct": pb.DATA_PLANE_DIRECT}
_TRUST_FIELDS = ("max_update_norm", "max_examples_per_client", "max_weight_share", "max_clients")


# -- federation configuration ----------------------------------------------------------------
def config_from_proto(spec: pb.FederationSpec) -> FederationConfig:
    policy = spec.round_policy
    data: dict[str, Any] = {
        "federation_id": spec.federation_id,
        "modules": [{"name": m.name, "d_out": m.d_out, "d_in": m.d_in} for m in spec.modules],
        "strategy_options": {k: _parse_option(v) for k, v in spec.strategy_options.items()},
        "allowed_ranks": tuple(spec.allowed_ranks),
        "init_seed": spec.init_seed,
        "min_partition_holders": spec.min_partition_holders or 2,
        "expected_clients": policy.expected_clients,
        "deadline_seconds": policy.deadline_seconds,
        "keep_rounds": policy.keep_rounds,
    }
    if spec.data_plane:
        planes = [k for k, v in _DATA_PLANES.items() if v == spec.data_plane]
        if not planes:
            raise ConfigError("data_plane", f"unknown enum value {spec.data_plane}")
        data["data_plane"] = planes[0]
    if spec.strategy:
        data["strategy"] = spec.strategy
    if spec.max_rank:
        data["max_rank"] = spec.max_rank
    elif spec.allowed_ranks:
        data["max_rank"] = max(spec.allowed_ranks)
    if spec.lora_alpha:
        data["lora_alpha"] = spec.lora_alpha
    if policy.min_clients:
        data["min_clients"] = policy.min_clients
    for name in _TRUST_FIELDS:
        value = getattr(spec.trust, name)
        if value:
            data[name] = value
    policy_fields = ("clients_per_round", "fraction", "stratify_by_rank", "over_selection", "seed")
    data["participation"] = {f: getattr(spec.participation, f) for f in policy_fields}
    robust = spec.robust
    data["robust"] = {
        "clip_norm": robust.clip_norm,
        "clip_quantile": robust.clip_quantile,
        "combine": robust.combine or "mean",
        "trim": robust.trim or 1,
    }
    data["privacy"] = {
        "noise_multiplier": spec.privacy.noise_multiplier,
        "clip_norm": spec.privacy.clip_norm,
        "delta": spec.privacy.delta or 1e-5,
    }
    for key, table, value in (
        ("scaling_rule", _SCALING, spec.scaling_rule),
        ("weighting", _WEIGHTING, spec.weighting),
        ("factor_split", _SPLIT, spec.factor_split),
    ):
        if value:
            matches = [k for k, v in table.items() if v == value]
            if not matches:
                raise ConfigError(key, f"unknown enum value {value}")
            data[key] = matches[0]
    return FederationConfig.parse(data)


def config_to_proto(c: FederationConfig) -> pb.FederationSpec:
    return pb.FederationSpec(
        federation_id=c.federation_id,
        modules=[pb.ModuleSpec(name=m.name, d_out=m.d_out, d_in=m.d_in) for m in c.modules],
        strategy=c.strategy,
        strategy_options={k: _format_option(v) for k, v in c.strategy_options.items()},
        max_rank=c.max_rank,
        allowed_ranks=list(c.allowed_ranks),
        lora_alpha=c.lora_alpha,
        scaling_rule=_SCALING[c.scaling_rule],
        weighting=_WEIGHTING[c.weighting],
        factor_split=_SPLIT[c.factor_split],
        round_policy=pb.RoundPolicy(
            min_clients=c.min_clients,
            expected_clients=c.expected_clients,
            deadline_seconds=c.deadline_seconds,
            keep_rounds=c.keep_rounds,
        ),
        init_seed=c.init_seed,
        min_partition_holders=c.min_partition_holders,
        data_plane=_DATA_PLANES[c.data_plane],
        trust=pb.TrustPolicy(**{name: getattr(c, name) for name in _TRUST_FIELDS}),
        participation=pb.ParticipationPolicy(
            clients_per_round=c.participation.clients_per_round,
            fraction=c.participation.fraction,
            stratify_by_rank=c.participation.stratify_by_rank,
            over_selection=c.participation.over_selection,
            seed=c.participation.seed,
        ),
        robust=pb.RobustPolicy(
            clip_norm=c.robust.clip_norm,
            clip_quantile=c.robust.clip_quantile,
            combine=c.robust.combine.value,
            trim=c.robust.trim,
        ),
        privacy=pb.PrivacyPolicy(
            noise_multiplier=c.privacy.noise_multiplier,
            clip_norm=c.privacy.clip_norm,
            delta=c.privacy.delta,
        ),
    )


def _parse_option(text: str) -> Any:
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return float(text)
    except ValueError:
        return text


def _format_option(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# -- rounds ----------------------------------------------------------------------------------
def energy_proto(energy: RankEnergy | None, holders: tuple[Holders, ...] = ()) -> pb.RankEnergy:
    if energy is None:
        return pb.RankEnergy()
    return pb.RankEnergy(
        partition_upper_ranks=list(energy.boundaries),
        partition_energy=list(energy.partition_energy),
        e_min=energy.e_min,
        effective_rank=energy.effective_rank,
        tail_energy=energy.tail_energy,
        partition_holders=[count for _, count, _ in holders],
        partition_holder_weight=[share for _, _, share in holders],
    )


def selection_of(s: Snapshot, client_id: str) -> pb.Selection.ValueType:
    if not client_id:
        return pb.SELECTION_UNSPECIFIED
    if client_id in s.observers:  # it may pull, never push
        return pb.SELECTION_NOT_SELECTED
    if s.selection_pending:
        return pb.SELECTION_PENDING
    if s.selected is None:
        return pb.SELECTION_EVERYONE
    return pb.SELECTION_SELECTED if client_id in s.selected else pb.SELECTION_NOT_SELECTED


def status_proto(s: Snapshot, client_id: str = "") -> pb.RoundStatus:
    return pb.RoundStatus(
        federation_id=s.federation_id,
        round=s.round,
        published_round=s.round,
        phase=_PHASES[s.phase],
        uploads=s.uploads,
        min_clients=s.min_clients,
        expected_clients=s.expected_clients,
        deadline_unix=s.deadline_unix,
        energy=energy_proto(s.energy, s.holders),
        joined_clients=s.joined_clients,
        degraded=s.degraded,
        selection=selection_of(s, client_id),
        selected_clients=len(s.selected) if s.selected is not None else 0,
        privacy=privacy_proto(s.privacy),
    )


def privacy_proto(p: PrivacyStatus | None) -> pb.PrivacySpent | None:
    if p is None:
        return None
    return pb.PrivacySpent(
        epsilon=p.epsilon,
        delta=p.delta,
        rounds=p.rounds,
        noise_multiplier=p.noise_multiplier,
        clip_norm=p.clip_norm,
        noise_std=p.noise_std,
    )


def event_proto(e: RoundEvent, client_id: str = "") -> pb.RoundEvent:
    return pb.RoundEvent(
        type=_EVENTS[e.type],
        status=status_proto(e.snapshot, client_id),
        message=e.message,
        warnings=list(e.warnings),
    )


def federation_proto(runtime: FederationRuntime) -> pb.Federation:
    return pb.Federation(
        spec=config_to_proto(runtime.config), status=status_proto(runtime.snapshot())
    )


def pull_header(view: View) -> pb.PullHeader:
    return pb.PullHeader(
        round=view.round,
        rank=view.rank,
        scale=view.scale,
        total_bytes=view.size,
        sha256=view.sha256,
        has_merge=view.has_merge,
        energy=energy_proto(view.energy, view.holders),
    )


def live_pull_header(live: LivePull) -> pb.PullHeader:
    """A pull's header for a view still being built: its digest follows in a trailer."""
    facts = live.facts
    return pb.PullHeader(
        round=facts.round,
        rank=live.rank,
        scale=live.scale,
        total_bytes=facts.total_bytes,
        sha256="",
        has_merge=facts.has_merge,
        energy=energy_proto(facts.energy, facts.holders),
    )


def push_response(outcome: PushOutcome) -> pb.PushResponse:
    return pb.PushResponse(
        round=outcome.round,
        duplicate=outcome.duplicate,
        received_bytes=outcome.size,
        uploads_in_round=outcome.uploads_in_round,
    )


def direct_upload_proto(grant: UploadGrant) -> pb.DirectUpload:
    return pb.DirectUpload(
        upload_id=grant.upload_id,
        url=grant.url,
        fields=grant.fields,
        expires_unix=grant.expires_unix,
    )


def direct_download_proto(view: View, grant: DownloadGrant) -> pb.DirectDownload:
    return pb.DirectDownload(
        header=pull_header(view), url=grant.url, expires_unix=grant.expires_unix
    )


def client_info_proto(c: ClientInfo) -> pb.ClientInfo:
    r = c.record
    return pb.ClientInfo(
        client_id=r.client_id,
        rank=r.rank,
        num_examples=r.num_examples,
        lora_alpha=r.lora_alpha,
        scale=r.scale,
        observer=r.observer,
        last_round_uploaded=c.last_round_uploaded,
    )
