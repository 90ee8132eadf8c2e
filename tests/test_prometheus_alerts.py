"""A real Prometheus scrapes a running server and evaluates the shipped alert rules.

One raflora-server runs a FlexLoRA and a raFLoRA federation side by side with clients of ranks
{2, 4, 8}: round 0 pushes random factors, every later round is a pass-through (each client
pushes back exactly what it pulled). Under FlexLoRA E_min climbs above 0.9 within two rounds
and keeps rising; under raFLoRA it stays put (tests/test_service_metrics.py). Prometheus
(Debian's package) scrapes /metrics every second and evaluates deploy/prometheus's rules every
second, with every ``for:`` cut to 1 s and the expressions exactly as shipped. Checked through
Prometheus' HTTP API: RafloraRankCollapse stays silent until FlexLoRA has spent 5 rounds above
the threshold (the server's own count, raflora_rank_collapse_rounds), then fires for "flex" and
never for "ra"; every dashboard query returns data; the alert keeps firing while the server is
down for a restart and after it resumes from its data directory (same count, same last
publication time); RafloraServerDown fires once the server stops.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import yaml

from raflora.client_sdk.errors import FailedPreconditionError
from raflora.server.testing import ThreadedServer, free_port, threaded_server

from .helpers.adapters import factors
from .helpers.deploy import all_rules, dashboard_queries, debian_tool, load_rules
from .helpers.deploy import rules_with_short_for as short_rules
from .helpers.federations import join_federations
from .helpers.waiting import wait_for
from .test_service_metrics import CLIENTS, MODULES

pytestmark = pytest.mark.slow

FEDERATIONS = {"flex": "flexlora", "ra": "raflora"}
ROUNDS = 7  # published rounds 1..7; flex is above 0.9 from round 2 on
COLLAPSE = "RafloraRankCollapse"
# Panels with no series unless something fails, and those of private federations (none here:
# their gauges are scraped in tests/test_privacy_service.py, their queries checked in
# tests/test_deploy.py).
MAY_BE_EMPTY = {
    "Aggregation failures",
    "Client-level privacy spent (epsilon)",
    "Private rounds published",
}


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.get("/api/v1/query", query=expr)["result"]
        return result

    def values(self, expr: str) -> dict[str, float]:
        """federation label -> value."""
        return {r["metric"].get("federation", ""): float(r["value"][1]) for r in self.query(expr)}

    def alerts(self, name: str) -> dict[str, str]:
        """federation (or instance) label -> state ("pending" or "firing") of one alert."""
        return {
            a["labels"].get("federation", a["labels"].get("instance", "")): a["state"]
            for a in self.get("/api/v1/alerts")["alerts"]
            if a["labels"]["alertname"] == name
        }


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[Callable[[int], Prometheus]]:
    binary = debian_tool("prometheus")
    processes: list[subprocess.Popen[bytes]] = []

    def start(metrics_port: int) -> Prometheus:
        rules = short_rules(seconds=1)
        for ours, shipped in zip(all_rules(rules), all_rules(load_rules()), strict=True):
            assert ours["expr"] == shipped["expr"]  # only `for:` differs from what ships
        (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
        config = {
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
            },
            "rule_files": ["rules.yml"],
            "scrape_configs": [
                {
                    "job_name": "raflora",
                    "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}],
                }
            ],
        }
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        log = (tmp_path / "prometheus.log").open("wb")
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        processes.append(process)
        prom = Prometheus(f"http://127.0.0.1:{port}")

        def ready() -> bool:
            assert process.poll() is None, (tmp_path / "prometheus.log").read_text()
            try:
                with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=1) as r:
                    return bool(r.status == 200)
            except OSError:
                return False

        wait_for("Prometheus to be ready", ready)
        return prom

    yield start
    for process in processes:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def test_rank_collapse_alert_fires_for_flexlora_only(
    tmp_path: Path, prometheus_factory: Callable[[int], Prometheus]
) -> None:
    metrics_port = free_port()
    with ExitStack() as outer:
        server = outer.enter_context(threaded_server(tmp_path / "data", metrics_port=metrics_port))
        prom = prometheus_factory(metrics_port)
        wait_for(
            "the first scrape",
            lambda: prom.values('up{job="raflora"}') == {"": 1.0},
        )
        with ExitStack() as stack:
            clients = join_federations(
                stack, server.target, FEDERATIONS, MODULES, CLIENTS, max_rank=8, init_seed=5
            )

            e_min: dict[str, list[float]] = {fed: [] for fed in FEDERATIONS}
            for t in range(ROUNDS):
                for fed in FEDERATIONS:
                    for i, (client, (_, rank, n, _)) in enumerate(
                        zip(clients[fed], CLIENTS, strict=True)
                    ):
                        tensors = factors(rank, i, MODULES) if t == 0 else client.pull().tensors
                        client.push(tensors, round=t, num_examples=n)
                    assert clients[fed][0].wait_for_round(t, timeout=60).round == t + 1
                # Prometheus scrapes every round and evaluates the rules on it before the
                # next one: the collapse count is in rounds, not seconds.
                published = {fed: float(t + 1) for fed in FEDERATIONS}
                wait_for(
                    f"round {t + 1} in Prometheus",
                    partial(lambda want: prom.values("raflora_current_round") == want, published),
                )
                time.sleep(1.2)  # more than one evaluation interval
                scraped = prom.values("raflora_rank_energy_min_ratio")
                for fed in FEDERATIONS:
                    e_min[fed].append(scraped[fed])
                if t + 1 == 5:  # flex above 0.9 in rounds 2..5: 4 rounds, one short of the alert
                    assert prom.values("raflora_rank_collapse_rounds") == {"flex": 4.0, "ra": 0.0}
                    assert prom.alerts(COLLAPSE) == {}

            # One refused upload (a stale round) so that the error panels have a series.
            with pytest.raises(FailedPreconditionError):
                clients["ra"][0].push(factors(2, 0, MODULES), round=0, num_examples=1)

        assert e_min["flex"][0] < 0.9 < e_min["flex"][1], e_min
        assert max(e_min["ra"]) < 0.9 and max(e_min["ra"]) - min(e_min["ra"]) < 1e-4, e_min
        wait_for("the collapse alert to fire", lambda: prom.alerts(COLLAPSE) == {"flex": "firing"})
        collapsed = {"flex": float(ROUNDS - 1), "ra": 0.0}  # rounds 2..7 above the threshold
        assert prom.values("raflora_rank_collapse_rounds") == collapsed
        published = prom.values("raflora_round_last_published_timestamp_seconds")
        # Nothing else fires on a healthy run.
        others = [
            a for a in prom.get("/api/v1/alerts")["alerts"] if a["labels"]["alertname"] != COLLAPSE
        ]
        assert others == []
        # The rules Prometheus loaded are healthy (no evaluation errors).
        groups = prom.get("/api/v1/rules")["groups"]
        assert all(r["health"] == "ok" for g in groups for r in g["rules"]), groups

        # Every dashboard query runs and, with real traffic behind it, returns series.
        time.sleep(2)
        for title, expr in dashboard_queries():
            if title not in MAY_BE_EMPTY:
                assert prom.query(expr), f"panel {title!r}: no data for {expr}"

        # A restart: the server goes away (failed scrapes mark its series stale) and comes back
        # on the same data directory. The alert keeps firing through both.
        outer.close()
        wait_for("the failed scrape", lambda: prom.values('up{job="raflora"}') == {"": 0.0})
        time.sleep(2)  # a few evaluations with the series stale
        assert prom.alerts(COLLAPSE) == {"flex": "firing"}
        restarted: ThreadedServer = outer.enter_context(
            threaded_server(tmp_path / "data", metrics_port=metrics_port)
        )
        wait_for("the next scrape", lambda: prom.values('up{job="raflora"}') == {"": 1.0})
        assert prom.values("raflora_rank_collapse_rounds") == collapsed  # recounted on resume
        assert prom.values("raflora_round_last_published_timestamp_seconds") == published
        assert prom.values("raflora_rounds_published_total") == {"flex": 0.0, "ra": 0.0}
        time.sleep(2)
        assert prom.alerts(COLLAPSE) == {"flex": "firing"}

        outer.close()  # stop the server
        wait_for(
            "RafloraServerDown to fire",
            lambda: (
                prom.alerts("RafloraServerDown")
                == {f"127.0.0.1:{restarted.server.metrics_port}": "firing"}
            ),
        )
