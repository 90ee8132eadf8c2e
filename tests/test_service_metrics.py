"""/metrics, scraped over HTTP, shows E_min rising under FlexLoRA and flat under raFLoRA.

One server runs a FlexLoRA and a raFLoRA federation side by side with the same clients: ranks
{2, 4, 8} (R = 8), unequal examples and unequal LoRA alphas. Round 0 pushes random factors so
that ΔW ≠ 0; then every round is a pass-through (each client pushes back exactly what it
pulled). The theory (docs/design.md §2.5, tests/test_passthrough.py) says FlexLoRA shrinks partition
k by c_k < 1 every round, so E_min rises, while raFLoRA keeps ΔW a fixed point. Here that is
read the way an operator would, from the Prometheus text over HTTP, along with the counters,
histograms and gauges a dashboard would use.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from raflora.client_sdk import RafloraClient
from raflora.server.engine import AdapterSchema, adapter_energy
from raflora.server.storage import FileFederationStore
from raflora.server.testing import ThreadedServer, threaded_server

from .helpers.adapters import factors
from .helpers.federations import join_federations
from .helpers.metrics import Samples, samples
from .helpers.metrics import sample_value as value

MODULES = {"layers.0.q": (24, 16), "layers.0.v": (16, 20)}
CLIENTS = [("c2", 2, 40, 4.0), ("c4", 4, 25, 16.0), ("c8", 8, 10, 32.0)]  # id, rank, n, alpha
FEDERATIONS = {"fl": "flexlora", "ra": "raflora"}
PASS_THROUGH_ROUNDS = 3


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ThreadedServer]:
    with threaded_server(tmp_path) as handle:
        yield handle


def test_metrics_show_collapse_under_flexlora_only(server: ThreadedServer) -> None:
    data_dir = server.server.settings.data_dir
    pushes: Counter[str] = Counter()  # per federation
    uploaded_bytes: Counter[tuple[str, int]] = Counter()  # per federation and rank
    e_min: dict[str, list[float]] = {fed: [] for fed in FEDERATIONS}
    eff_rank: dict[str, list[float]] = {fed: [] for fed in FEDERATIONS}

    with ExitStack() as stack:
        clients: dict[str, list[RafloraClient]] = join_federations(
            stack, server.target, FEDERATIONS, MODULES, CLIENTS, max_rank=8, init_seed=5
        )

        for t in range(PASS_THROUGH_ROUNDS + 1):
            for fed in FEDERATIONS:
                for i, (client, (_, rank, n, _)) in enumerate(
                    zip(clients[fed], CLIENTS, strict=True)
                ):
                    if t == 0:
                        tensors = factors(rank, i, MODULES)
                    else:  # pass-through: push back exactly what was pulled
                        pulled = client.pull()
                        assert (pulled.round, pulled.rank) == (t, rank)
                        tensors = pulled.tensors
                    result = client.push(tensors, round=t, num_examples=n)
                    assert result.round == t and not result.duplicate
                    pushes[fed] += 1
                    uploaded_bytes[(fed, rank)] += result.received_bytes
                assert clients[fed][0].wait_for_round(t, timeout=60).round == t + 1

            scraped = samples(server.metrics_url)
            published = t + 1
            for fed in FEDERATIONS:
                status = clients[fed][0].status()
                assert status.round == published
                check_round_metrics(scraped, fed, published, pushes[fed], uploaded_bytes)
                e = value(scraped, "raflora_rank_energy_min_fraction", federation=fed)
                # The gauge is the published state's E_min: same as GetRound and the engine.
                assert e == pytest.approx(status.energy.e_min, abs=1e-12)
                state = FileFederationStore(data_dir / "federations" / fed).load_published(
                    published, AdapterSchema.from_shapes(MODULES)
                )[0]
                assert e == pytest.approx(adapter_energy(state).overall.e_min, abs=1e-6)
                e_min[fed].append(e)
                eff_rank[fed].append(value(scraped, "raflora_rank_effective_rank", federation=fed))
            assert value(scraped, "raflora_rpcs_total", method="Push", code="OK") == sum(
                pushes.values()
            )
            pulls = frozenset({("method", "Pull"), ("code", "OK")})
            assert scraped.get(("raflora_rpcs_total", pulls), 0) == (
                t * len(CLIENTS) * len(FEDERATIONS)
            )
        assert value(scraped, "raflora_rpcs_total", method="Join", code="OK") == (
            len(CLIENTS) * len(FEDERATIONS)
        )

    # e_min[fed][0] follows the random round; every later entry follows a pass-through round.
    fl, ra = e_min["fl"], e_min["ra"]
    assert 0.0 < fl[0] < 0.9 and 0.0 < ra[0] < 0.9  # energy not yet in the top ρ_1 directions
    assert all(b > a + 1e-3 for a, b in itertools.pairwise(fl)), fl
    assert all(abs(b - a) < 1e-4 for a, b in itertools.pairwise(ra)), ra
    assert fl[-1] > fl[0] + 0.1
    assert all(b < a for a, b in itertools.pairwise(eff_rank["fl"])), eff_rank["fl"]
    assert max(eff_rank["ra"]) - min(eff_rank["ra"]) < 1e-3, eff_rank["ra"]


def check_round_metrics(
    scraped: Samples,
    fed: str,
    published: int,
    pushes: int,
    uploaded_bytes: Counter[tuple[str, int]],
) -> None:
    """Counters, gauges and histograms of one federation after round ``published``."""
    assert value(scraped, "raflora_rounds_published_total", federation=fed) == published
    assert value(scraped, "raflora_current_round", federation=fed) == published
    assert value(scraped, "raflora_round_uploads", federation=fed) == 0  # a fresh round
    assert value(scraped, "raflora_active_clients", federation=fed) == len(CLIENTS)
    for _, rank, _, _ in CLIENTS:
        labels = {"federation": fed, "rank": str(rank)}
        assert value(scraped, "raflora_uploads_total", **labels) == published
        assert (
            value(scraped, "raflora_upload_bytes_total", **labels) == (uploaded_bytes[(fed, rank)])
        )
    assert ("raflora_upload_errors_total", frozenset({("federation", fed)})) not in scraped
    assert value(scraped, "raflora_push_duration_seconds_count", federation=fed) == pushes
    assert value(scraped, "raflora_push_duration_seconds_sum", federation=fed) > 0
    assert (
        value(scraped, "raflora_push_duration_seconds_bucket", federation=fed, le="+Inf") == pushes
    )
    strategy = FEDERATIONS[fed]
    assert value(
        scraped,
        "raflora_aggregation_duration_seconds_count",
        federation=fed,
        strategy=strategy,
    ) == (published)

    # Partitions are the participants' ranks: (0,2], (2,4], (4,8]; with the tail they sum to 1.
    parts = {
        dict(labels)["upper_rank"]: v
        for (name, labels), v in scraped.items()
        if name == "raflora_rank_partition_energy" and dict(labels)["federation"] == fed
    }
    assert sorted(parts, key=int) == ["2", "4", "8"]
    assert all(0.0 <= v <= 1.0 for v in parts.values())
    tail = value(scraped, "raflora_rank_tail_energy", federation=fed)
    assert 0.0 <= tail < 1e-6  # the state's rank never exceeds the largest participant's
    assert math.isclose(sum(parts.values()), 1.0 - tail, abs_tol=1e-6)
    assert value(
        scraped, "raflora_rank_partition_energy", federation=fed, partition="1", upper_rank="2"
    ) == value(scraped, "raflora_rank_energy_min_fraction", federation=fed)
