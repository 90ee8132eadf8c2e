"""The raflora-server command: health, reflection, settings precedence, SIGTERM shutdown."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from raflora.client_sdk import AdminClient, InvalidArgumentError, RafloraClient, pb
from raflora.server.api.serde import config_from_proto, config_to_proto
from raflora.server.settings import load_settings
from raflora.server.testing import scrape, start_server_process, threaded_server, wait_serving

from .helpers.federations import spec


def test_server_process_serves_reflects_and_stops_on_sigterm(tmp_path: Path) -> None:
    server = start_server_process(tmp_path / "data", tmp_path / "server.log")
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            replies = stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
            names = {s.name for r in replies for s in r.list_services_response.service}
        assert {
            "raflora.v1.AggregationService",
            "raflora.v1.AdminService",
            "grpc.health.v1.Health",
        } <= names
        assert "raflora_rpcs_total" in scrape(server.metrics_url)
    finally:
        code = server.terminate()
    assert code == 0
    assert "shutdown requested" in server.log_text()


def test_federations_survive_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = start_server_process(data, tmp_path / "a.log")
    try:
        AdminClient(server.target).create_federation(spec("kept", {"m": (8, 8)}, max_rank=4))
        with RafloraClient(server.target, "kept", "c1") as client:
            client.join(rank=4, num_examples=3)
    finally:
        assert server.terminate() == 0
    server = start_server_process(data, tmp_path / "b.log")
    try:
        fed = AdminClient(server.target).get_federation("kept")
        assert fed.spec.max_rank == 4 and fed.status.joined_clients == 1
    finally:
        server.terminate()


def test_settings_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "settings.json"
    config.write_text(json.dumps({"port": 6000, "chunk_size": 65536, "device": "cpu"}))
    monkeypatch.setenv("RAFLORA_PORT", "7000")
    settings = load_settings(config, data_dir=tmp_path)
    assert settings.port == 7000  # environment beats the file
    assert settings.chunk_size == 65536  # the file beats defaults
    assert settings.data_dir == tmp_path  # arguments beat everything
    monkeypatch.setenv("RAFLORA_CHUNK_SIZE", "12")
    with pytest.raises(ValueError, match="chunk_size"):
        load_settings(config)


def test_federation_spec_round_trips_and_validates() -> None:
    wire = spec(
        "x",
        {"a": (4, 6), "b": (3, 3)},
        strategy="hetlora",
        max_rank=4,
        strategy_options={"norm_weighted": "true"},
        allowed_ranks=[2, 4],
    )
    config = config_from_proto(wire)
    assert config.strategy_options == {"norm_weighted": True}
    assert config_from_proto(config_to_proto(config)) == config
    with pytest.raises(ValueError, match="allowed_ranks"):
        config_from_proto(spec("x", {"a": (4, 6)}, max_rank=4, allowed_ranks=[8]))
    with pytest.raises(ValueError, match="federation_id"):
        config_from_proto(spec("../etc", {"a": (4, 6)}))


def test_federations_file_bootstraps_an_embedded_default(tmp_path: Path) -> None:
    fed_file = tmp_path / "feds.json"
    fed_file.write_text(
        json.dumps(
            [{"federation_id": "default", "modules": [{"name": "m", "d_out": 4, "d_in": 4}]}]
        )
    )
    with threaded_server(tmp_path / "d", federations_file=fed_file) as server:
        admin = AdminClient(server.target)
        fed = admin.get_federation("default")
        assert fed.spec.strategy == "raflora_ha" and fed.spec.max_rank == 16
        with pytest.raises(InvalidArgumentError) as info:
            admin.create_federation(
                pb.FederationSpec(
                    federation_id="bad",
                    strategy="nope",
                    modules=[pb.ModuleSpec(name="m", d_out=1, d_in=1)],
                )
            )
        assert info.value.field == "strategy"
        wait_serving(server.target)
