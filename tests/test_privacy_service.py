"""Client-level DP through the real server and SDK (docs/design.md §2.9).

A private federation of six reports, in its round status, its round events and Prometheus,
the ε that the dp-accounting package computes for the rounds it ran; its manifests record the
mechanism and each client's clip; an attacker's −1000× upload is clipped to the same bound as
everyone; a sampled federation is accounted with its amplification; the privacy record
survives a restart and a manifest that lost it degrades the federation instead of
under-reporting; specs that would break the sensitivity bound are refused naming the field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from raflora.client_sdk import AdminClient, InvalidArgumentError, RafloraClient, pb
from raflora.server.engine.accountant import DpRound, epsilon_spent
from raflora.server.storage import FileFederationStore
from raflora.server.testing import federation_spec, scrape, threaded_server

MODULES = {"q": (16, 12), "v": (10, 12)}
RANKS = [2, 2, 4, 4, 8, 8]
Z, CLIP, DELTA = 1.3, 2.0, 1e-6


def private_spec(name: str, **extra: Any) -> pb.FederationSpec:
    spec = federation_spec(
        name,
        MODULES,
        strategy="raflora_ha",
        max_rank=8,
        min_clients=6,
        expected_clients=6,
        weighting=pb.WEIGHTING_UNIFORM,
        **extra,
    )
    spec.privacy.CopyFrom(pb.PrivacyPolicy(noise_multiplier=Z, clip_norm=CLIP, delta=DELTA))
    return spec


def update(k: int, rank: int, gain: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(k)
    out = {}
    for m, (o, i) in MODULES.items():
        out[f"{m}.lora_A.weight"] = torch.randn(rank, i, generator=g)
        out[f"{m}.lora_B.weight"] = gain * 0.1 * torch.randn(o, rank, generator=g)
    return out


def run_round(clients: list[RafloraClient], round_: int, attacker: int | None = None) -> None:
    for k, c in enumerate(clients):
        status = c.status()
        if status.selection == pb.SELECTION_NOT_SELECTED:
            continue
        c.push(
            update(10 * round_ + k, RANKS[k], -1000.0 if k == attacker else 1.0),
            round=round_,
            num_examples=10,
        )


def gauge(text: str, name: str, federation: str) -> float:
    found = re.search(rf'^{name}{{federation="{federation}"}} (\S+)$', text, re.M)
    assert found, f"{name} for {federation} not exported"
    return float(found.group(1))


def test_a_private_federation_reports_the_accountants_epsilon(tmp_path: Path) -> None:
    with threaded_server(tmp_path) as server:
        with AdminClient(server.target) as admin:
            admin.create_federation(private_spec("dp"))
            assert admin.get_federation("dp").spec.privacy.noise_multiplier == Z
        clients = [RafloraClient(server.target, "dp", f"c{k}") for k in range(6)]
        for c, r in zip(clients, RANKS, strict=True):
            c.join(rank=r, num_examples=10)
        before = clients[0].status().privacy
        assert (before.epsilon, before.rounds, before.noise_multiplier) == (0.0, 0, Z)
        assert gauge(scrape(server.metrics_url), "raflora_privacy_epsilon", "dp") == 0.0
        for t in range(2):
            run_round(clients, t, attacker=5)
            status = clients[0].wait_for_round(t, timeout=60)  # the PUBLISHED event's status
            expected = epsilon_spent({DpRound.unamplified(Z): t + 1}, DELTA)
            assert status.privacy.epsilon == pytest.approx(expected, rel=1e-12)
            assert status.privacy.rounds == t + 1
            assert status.privacy.noise_std == pytest.approx(Z * 2 * CLIP / 6)
            metrics = scrape(server.metrics_url)
            assert gauge(metrics, "raflora_privacy_epsilon", "dp") == pytest.approx(expected)
            assert gauge(metrics, "raflora_privacy_rounds", "dp") == t + 1
        store = FileFederationStore(server.server.settings.data_dir / "federations" / "dp")
        manifest = store.read_manifest(2)
        for c in clients:
            c.close()
    assert manifest.privacy is not None
    assert manifest.privacy.epsilon == pytest.approx(
        epsilon_spent({DpRound.unamplified(Z): 2}, DELTA)
    )
    assert manifest.privacy.denominator == 6 and manifest.privacy.sample == manifest.privacy.roster
    uploads = {u.client_id: u for u in manifest.uploads}
    assert all(u.weight_share == pytest.approx(1 / 6) for u in uploads.values())
    honest_clip = min(u.clip for k, u in uploads.items() if k != "c5")
    assert uploads["c5"].clip < 1e-2 * honest_clip  # −1000× is clipped to the same C


def test_a_sampled_federation_is_accounted_without_amplification(tmp_path: Path) -> None:
    """The draw is reproducible from the spec's seed, so it is no secret: no amplification
    is claimed (docs/design.md §2.9), and the denominator is the quota, 3 of 6."""
    spec = private_spec("dps", participation=pb.ParticipationPolicy(fraction=0.5, seed=3))
    with threaded_server(tmp_path) as server:
        with AdminClient(server.target) as admin:
            admin.create_federation(spec)
        clients = [RafloraClient(server.target, "dps", f"c{k}") for k in range(6)]
        for c, r in zip(clients, RANKS, strict=True):
            c.join(rank=r, num_examples=10)
        clients[0].wait_for_selection(0, timeout=30)
        run_round(clients, 0)
        status = clients[0].wait_for_round(0, timeout=60)
        for c in clients:
            c.close()
    unamplified = epsilon_spent({DpRound.unamplified(Z): 1}, DELTA)
    assert status.privacy.epsilon == pytest.approx(unamplified, rel=1e-12)
    assert status.privacy.noise_std == pytest.approx(Z * 2 * CLIP / 3)  # m̄ = the quota, 3


def test_the_privacy_record_survives_a_restart_and_its_loss_degrades(tmp_path: Path) -> None:
    with threaded_server(tmp_path) as server:
        with AdminClient(server.target) as admin:
            admin.create_federation(private_spec("dp"))
        clients = [RafloraClient(server.target, "dp", f"c{k}") for k in range(6)]
        for c, r in zip(clients, RANKS, strict=True):
            c.join(rank=r, num_examples=10)
        run_round(clients, 0)
        spent = clients[0].wait_for_round(0, timeout=60).privacy.epsilon
        for c in clients:
            c.close()
    with threaded_server(tmp_path) as server, RafloraClient(server.target, "dp", "c0") as c:
        assert c.status().privacy.epsilon == pytest.approx(spent)
        assert gauge(scrape(server.metrics_url), "raflora_privacy_epsilon", "dp") == pytest.approx(
            spent
        )
        data_dir = server.server.settings.data_dir
    path = data_dir / "federations" / "dp" / "rounds"
    manifest_file = next(path.glob("*1/manifest.json"))
    original = manifest_file.read_text()
    tampers: tuple[tuple[str, Callable[[dict[str, Any]], object]], ...] = (
        ("lost", lambda raw: raw.pop("privacy")),
        ("epsilon lowered", lambda raw: raw["privacy"].update(epsilon=0.01)),
        ("other z", lambda raw: raw["privacy"].update(history=[[0.5, 1, 1, 1]])),
        ("rounds lost", lambda raw: raw["privacy"].update(history=[])),
    )
    for name, tamper in tampers:
        raw = json.loads(original)
        tamper(raw)
        manifest_file.write_text(json.dumps(raw))
        with threaded_server(tmp_path) as server, AdminClient(server.target) as admin:
            degraded = admin.get_federation("dp").status.degraded
            assert "privacy" in degraded, (name, degraded)
    manifest_file.write_text(original)
    with threaded_server(tmp_path) as server, AdminClient(server.target) as admin:
        assert not admin.get_federation("dp").status.degraded  # the intact record resumes


REFUSED: dict[str, tuple[dict[str, Any], str]] = {
    "examples-weighting": ({"weighting": pb.WEIGHTING_EXAMPLES}, "weighting"),
    "hetlora": ({"strategy": "hetlora"}, "privacy"),
    "robust-too": ({"robust": pb.RobustPolicy(clip_quantile=0.5)}, "robust"),
    "no-clip": ({"privacy": pb.PrivacyPolicy(noise_multiplier=1.0)}, "privacy.clip_norm"),
    "nan-noise": (
        {"privacy": pb.PrivacyPolicy(noise_multiplier=float("nan"), clip_norm=1.0)},
        "privacy.noise_multiplier",
    ),
    "delta-1": (
        {"privacy": pb.PrivacyPolicy(noise_multiplier=1.0, clip_norm=1.0, delta=1.0)},
        "privacy.delta",
    ),
}


def test_specs_that_would_break_the_bound_are_refused_naming_the_field(tmp_path: Path) -> None:
    with threaded_server(tmp_path) as server, AdminClient(server.target) as admin:
        for name, (change, field) in REFUSED.items():
            spec = private_spec(name)
            for key, value in change.items():
                if isinstance(value, str | int):
                    setattr(spec, key, value)
                else:
                    getattr(spec, key).CopyFrom(value)
            with pytest.raises(InvalidArgumentError) as exc:
                admin.create_federation(spec)
            assert exc.value.field == field, (name, exc.value)
        admin.create_federation(private_spec("fine"))  # the server still serves
