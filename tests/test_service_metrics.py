"""/metrics, scraped over HTTP, shows E_min rising under FlexLoRA and flat under raFLoRA.

One server runs a FlexLoRA and a raFLoRA federation side by side with the same clients: ranks
{2, 4, 8} (R = 8), unequal examples and unequal LoRA alphas. Round 0 pushes random factors so
that ΔW ≠ 0; then every round is a pass-through (each client pushes back exactly what it
pulled). The theory (docs/design.md §2.5, tests/test_passthrough.py) says FlexLoRA shrinks partition
k by c_k < 1 every round, so E_min rises, while raFLoRA keeps ΔW a fixed point. Here that is
read the way an operator would, from the Prometheus text over HTTP, along with the counters,
histograms and gauges a dashboard would use: the process collectors and raflora_build_info,
the error counters created at 0 before any refusal, the 0-1 gauges under their ``_ratio``
names with the deprecated old names equal to them, and the server's own count of collapsing
rounds, which a restart keeps (recounted from the stored manifests) like the last publication
time.
"""

from __future__ import annotations

import importlib.metadata
import itertools
import math
import platform
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch

from raflora.client_sdk import RafloraClient
from raflora.client_sdk.errors import FailedPreconditionError
from raflora.server.engine import AdapterSchema, adapter_energy
from raflora.server.errors import ErrorKind
from raflora.server.metrics import DEPRECATED_RATIO_NAMES
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

    threshold = server.server.settings.collapse_e_min_threshold
    with ExitStack() as stack:
        clients: dict[str, list[RafloraClient]] = join_federations(
            stack, server.target, FEDERATIONS, MODULES, CLIENTS, max_rank=8, init_seed=5
        )
        check_process_metrics(samples(server.metrics_url))

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
                # The server's own count of the newest rounds above the collapse threshold.
                rounds = value(scraped, "raflora_rank_collapse_rounds", federation=fed)
                assert rounds == trailing_above(e_min[fed], threshold), (fed, e_min[fed])
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
        # The first refusal shows as a step from 0 (the series existed), not as a new series.
        with pytest.raises(FailedPreconditionError):
            clients["ra"][0].push(factors(2, 0, MODULES), round=0, num_examples=1)
        refused = samples(server.metrics_url)
        assert (
            value(
                refused, "raflora_upload_errors_total", federation="ra", code="FAILED_PRECONDITION"
            )
            == 1
        )
        assert value(refused, "raflora_upload_errors_total", federation="fl", code="DATA_LOSS") == 0

    # e_min[fed][0] follows the random round; every later entry follows a pass-through round.
    fl, ra = e_min["fl"], e_min["ra"]
    assert 0.0 < fl[0] < 0.9 and 0.0 < ra[0] < 0.9  # energy not yet in the top ρ_1 directions
    assert all(b > a + 1e-3 for a, b in itertools.pairwise(fl)), fl
    assert all(abs(b - a) < 1e-4 for a, b in itertools.pairwise(ra)), ra
    assert fl[-1] > fl[0] + 0.1
    assert value(scraped, "raflora_rank_collapse_rounds", federation="fl") >= 1  # it collapsed
    assert value(scraped, "raflora_rank_collapse_rounds", federation="ra") == 0
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
    # Every refusal code exists at 0 before the first refusal, so increase() sees it.
    for kind in ErrorKind:
        assert value(scraped, "raflora_upload_errors_total", federation=fed, code=kind.value) == 0
    assert value(scraped, "raflora_aggregation_failures_total", federation=fed) == 0
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
    check_ratio_names(scraped, fed)


def trailing_above(values: list[float], threshold: float) -> int:
    """How many of the newest ``values`` in a row are above ``threshold``."""
    return sum(1 for _ in itertools.takewhile(lambda v: v > threshold, reversed(values)))


def check_ratio_names(scraped: Samples, fed: str) -> None:
    """The 0-1 gauges under their ``_ratio`` names; each old name, deprecated for one release,
    carries the same series with the same values."""
    for old, new in DEPRECATED_RATIO_NAMES.items():
        assert new.endswith("_ratio")
        new_series = {
            labels: v
            for (name, labels), v in scraped.items()
            if name == new and ("federation", fed) in labels
        }
        old_series = {
            labels: v
            for (name, labels), v in scraped.items()
            if name == old and ("federation", fed) in labels
        }
        assert new_series, f"{new} missing for {fed}"
        assert new_series == old_series, (old, new)
        assert all(0.0 <= v <= 1.0 for v in new_series.values()), new


def check_process_metrics(scraped: Samples) -> None:
    """The process collectors and raflora_build_info, on the server's own registry."""
    names = {name for name, _ in scraped}
    for needed in (
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "python_gc_collections_total",
        "python_info",
    ):
        assert needed in names, needed
    (info,) = [
        dict(labels) for (name, labels), _ in scraped.items() if name == "raflora_build_info"
    ]
    assert info == {
        "version": importlib.metadata.version("raflora"),
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "device": "cpu",
    }
    assert value(scraped, "raflora_build_info", **info) == 1


def test_collapse_count_and_publish_time_survive_a_restart(tmp_path: Path) -> None:
    """A restarted server exports the same collapse count (recounted from the stored
    manifests) and the newest round's publication time, not "now": the alerts' evidence."""
    fed, rounds = "fl", PASS_THROUGH_ROUNDS + 1
    with threaded_server(tmp_path) as first, ExitStack() as stack:
        clients = join_federations(
            stack, first.target, {fed: "flexlora"}, MODULES, CLIENTS, max_rank=8, init_seed=5
        )[fed]
        for t in range(rounds):
            for i, (client, (_, rank, n, _)) in enumerate(zip(clients, CLIENTS, strict=True)):
                tensors = factors(rank, i, MODULES) if t == 0 else client.pull().tensors
                client.push(tensors, round=t, num_examples=n)
            assert clients[0].wait_for_round(t, timeout=60).round == t + 1
        before = samples(first.metrics_url)
    collapsed = value(before, "raflora_rank_collapse_rounds", federation=fed)
    assert 1 <= collapsed <= rounds
    manifest = FileFederationStore(tmp_path / "federations" / fed).read_manifest(rounds)
    published = value(before, "raflora_round_last_published_timestamp_seconds", federation=fed)
    assert published == manifest.published_unix
    with threaded_server(tmp_path) as second:
        after = samples(second.metrics_url)
    assert value(after, "raflora_current_round", federation=fed) == rounds
    assert value(after, "raflora_rank_collapse_rounds", federation=fed) == collapsed
    assert value(after, "raflora_round_last_published_timestamp_seconds", federation=fed) == (
        published
    )
    # A stricter threshold recounts the same manifests to fewer rounds (or none).
    with threaded_server(tmp_path, collapse_e_min_threshold=1.0) as strict:
        assert (
            value(samples(strict.metrics_url), "raflora_rank_collapse_rounds", federation=fed) == 0
        )
