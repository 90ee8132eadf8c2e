"""Robust weighing over the real server: one of six clients pushes −10× its honest update.

Three federations receive the same honest uploads: one without the attacker (the reference),
one with it under plain raflora_ha, and one with it under a RobustPolicy (clip to the 0.8 quantile
of the norms, then median trust). The robust global update stays within 15% of the honest-only one
(relative Frobenius distance), the plain one is pushed far away; the weight the robust round
gave the attacker is visible in its manifest.
"""

from __future__ import annotations

from pathlib import Path

import torch

from raflora.client_sdk import AdminClient, RafloraClient, lora_state_dict, module_factors, pb
from raflora.server.storage import FileFederationStore
from raflora.server.testing import federation_spec, threaded_server

MODULES = {"q": (24, 20), "v": (16, 20)}
RANKS = [4, 4, 8, 8, 8, 8]  # client 5 (rank 8) is the attacker
ALPHA = 16.0


def honest_update(k: int, rank: int) -> dict[str, torch.Tensor]:
    """Clients agree on a shared direction up to a little noise of their own; B carries 1/s
    (s = alpha/r), as after a pull, so that s·B·A agrees across ranks on shared indices."""
    base = torch.Generator().manual_seed(7)
    own = torch.Generator().manual_seed(100 + k)
    pairs = {}
    for m, (o, i) in MODULES.items():
        B = torch.randn(o, 8, generator=base)[:, :rank] + 0.05 * torch.randn(o, rank, generator=own)
        A = torch.randn(8, i, generator=base)[:rank] + 0.05 * torch.randn(rank, i, generator=own)
        pairs[m] = (B * 0.1 * rank / ALPHA, A)
    return lora_state_dict(pairs)


def dense_state(client: RafloraClient) -> torch.Tensor:
    pulled = client.pull()
    parts = module_factors(pulled.tensors)
    return torch.cat(
        [(pulled.scale * parts[m][0].double() @ parts[m][1].double()).ravel() for m in MODULES]
    )


def test_a_sign_flip_attacker_is_contained_by_the_robust_policy(tmp_path: Path) -> None:
    feds = {
        "honest": federation_spec(
            "honest",
            MODULES,
            strategy="raflora_ha",
            max_rank=8,
            min_clients=5,
            expected_clients=5,
            lora_alpha=ALPHA,
        ),
        "plain": federation_spec(
            "plain",
            MODULES,
            strategy="raflora_ha",
            max_rank=8,
            min_clients=6,
            expected_clients=6,
            lora_alpha=ALPHA,
        ),
        "robust": federation_spec(
            "robust",
            MODULES,
            strategy="raflora_ha",
            max_rank=8,
            min_clients=6,
            expected_clients=6,
            lora_alpha=ALPHA,
        ),
    }
    feds["robust"].robust.CopyFrom(pb.RobustPolicy(clip_quantile=0.8, combine="median_trust"))
    with threaded_server(tmp_path) as server:
        with AdminClient(server.target) as admin:
            for spec in feds.values():
                admin.create_federation(spec)
            assert admin.get_federation("robust").spec.robust.combine == "median_trust"
        states = {}
        for fed in feds:
            clients = [RafloraClient(server.target, fed, f"c{k}") for k in range(len(RANKS))]
            for k, (client, rank) in enumerate(zip(clients, RANKS, strict=True)):
                if fed == "honest" and k == 5:
                    continue
                client.join(rank=rank, num_examples=10, lora_alpha=ALPHA)
                update = honest_update(k, rank)
                if k == 5:  # the attacker: −10× its honest update
                    update = {
                        n: (-10 * t if n.endswith("lora_B.weight") else t)
                        for n, t in update.items()
                    }
                client.push(update, round=0, num_examples=10)
            observer = RafloraClient(server.target, fed, "observer")
            observer.join(rank=8, num_examples=0, lora_alpha=ALPHA, observer=True)
            observer.wait_for_round(0, timeout=60)
            states[fed] = dense_state(observer)
            for c in [*clients, observer]:
                c.close()
        manifest = FileFederationStore(
            server.server.settings.data_dir / "federations" / "robust"
        ).read_manifest(1)
    reference = states["honest"].norm()
    robust_error = float((states["robust"] - states["honest"]).norm() / reference)
    plain_error = float((states["plain"] - states["honest"]).norm() / reference)
    assert robust_error < 0.15, robust_error
    assert plain_error > 1.0, plain_error
    shares = {u.client_id: u.weight_share for u in manifest.uploads}
    assert shares["c5"] < 0.05 * min(v for k, v in shares.items() if k != "c5")


HOSTILE_POLICIES = {
    "nan-bound": (pb.RobustPolicy(clip_norm=float("nan")), "robust.clip_norm"),
    "inf-bound": (pb.RobustPolicy(clip_norm=float("inf")), "robust.clip_norm"),
    "negative-quantile": (pb.RobustPolicy(clip_quantile=-1), "robust.clip_quantile"),
    "quantile-above-1": (pb.RobustPolicy(clip_quantile=2), "robust.clip_quantile"),
    "unknown-combine": (pb.RobustPolicy(combine="x" * 100_000), "robust.combine"),
    "huge-trim": (pb.RobustPolicy(combine="trimmed", trim=4_000_000_000), "robust.trim"),
}


def test_hostile_robust_policies_are_refused_naming_the_field(tmp_path: Path) -> None:
    from raflora.client_sdk import InvalidArgumentError

    with threaded_server(tmp_path) as server, AdminClient(server.target) as admin:
        for name, (policy, field) in HOSTILE_POLICIES.items():
            spec = federation_spec(name, MODULES)
            spec.robust.CopyFrom(policy)
            try:
                admin.create_federation(spec)
            except InvalidArgumentError as exc:
                assert exc.field == field, (name, exc)
                assert len(str(exc)) < 1100  # the 100 kB string is not echoed back
            else:
                raise AssertionError(f"{name} was accepted")
        admin.create_federation(federation_spec("fine", MODULES))  # the server still serves
        assert admin.get_federation("fine").spec.federation_id == "fine"
