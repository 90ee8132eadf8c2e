"""Module-sharded aggregation on a real Ray cluster (issue 13, part 3).

A one-node cluster (``ray start --head``, 2 CPUs) runs for the session. Each module of a round
is a Ray task; the published round must be the in-process one. Ray's workers run each task on
one thread, and the in-process engine on one thread gives the same bits; on two threads fp32
sums in another order, so there the rounds agree to fp32 precision only (the in-process path
differs from itself between one and two threads as much; docs/design.md §5.2).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import torch

from raflora.client_sdk import AdminClient, RafloraClient, lora_state_dict
from raflora.server.cluster.ray_modules import (
    CLIENT_SERVER_RACE,
    RayModuleMap,
    join_retrying,
)
from raflora.server.engine import (
    AdapterSchema,
    ClientUpdate,
    FactorPair,
    GlobalState,
    RankError,
    StrategyConfig,
    make_strategy,
)
from raflora.server.testing import ThreadedServer, scrape, start_server_process, threaded_server
from raflora.server.testing_ray import RAY_ENV, RayCluster, ray_cluster, running_tasks

from .helpers.federations import every_client_spec
from .test_trust_boundary import POISON, POISON_TRUST, Attack, run_attack
from .test_trust_boundary import (
    test_a_whale_is_capped_at_max_weight_share as whale_is_capped,
)

SCHEMA = AdapterSchema.from_shapes({"q": (48, 32), "v": (32, 64), "o": (40, 40)})
STRATEGIES = ["raflora", "flexlora", "raflora_ha", "hetlora", "rbla", "flora"]


Tensor = torch.Tensor


def decaying(d_out: int, d_in: int, rank: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """A LoRA pair with a decaying spectrum, as trained adapters have."""
    B = torch.randn(d_out, rank, generator=g) * torch.logspace(0, -1.5, rank)
    A = torch.randn(rank, d_in, generator=g) / d_in**0.5
    return B, A


def uploads(schema: AdapterSchema, ranks: Sequence[int], seed: int) -> list[ClientUpdate]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, r in enumerate(ranks):
        factors = {}
        for name, shape in schema.modules.items():
            B, A = decaying(shape.d_out, shape.d_in, r, g)
            factors[name] = FactorPair(B=B, A=A)
        out.append(ClientUpdate(f"c{i}", r, 10 + 7 * i, 16.0 / r, factors))
    return out


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def relative_gap(a: GlobalState, b: GlobalState) -> float:
    return max(
        float((a.dense(n) - b.dense(n)).norm() / b.dense(n).norm().clamp_min(1e-30))
        for n in a.modules
    )


@pytest.fixture
def ray_map(ray_head: RayCluster) -> RayModuleMap:
    module_map = RayModuleMap(ray_head.gcs_address)
    module_map.connect()
    return module_map


# -- the engine's module jobs on the cluster -------------------------------------------------


@pytest.mark.parametrize("name", STRATEGIES)
def test_a_round_on_ray_is_the_in_process_round(ray_map: RayModuleMap, name: str) -> None:
    strategy = make_strategy(name, StrategyConfig(schema=SCHEMA, max_rank=8))
    round1 = uploads(SCHEMA, [2, 4, 8], 1)
    round2 = uploads(SCHEMA, [8, 2, 4, 4], 2)
    on_ray_1 = strategy.aggregate(strategy.initial_state(), round1, map_modules=ray_map)
    on_ray_2 = strategy.aggregate(on_ray_1, round2, map_modules=ray_map)
    with torch_threads(1):
        here_1 = strategy.aggregate(strategy.initial_state(), round1)
        here_2 = strategy.aggregate(here_1, round2)
    with torch_threads(2):
        two_threads = strategy.aggregate(
            strategy.aggregate(strategy.initial_state(), round1), round2
        )
    assert relative_gap(on_ray_1, here_1) <= 1e-6
    assert relative_gap(on_ray_2, here_2) <= 1e-6
    assert relative_gap(on_ray_2, two_threads) <= 1e-4  # fp32, another summation order
    assert on_ray_2.round == here_2.round == 2
    assert on_ray_2.participant_ranks == here_2.participant_ranks == (8, 2, 4, 4)
    assert on_ray_2.weights == here_2.weights
    assert ray_map.tasks == 2 * len(SCHEMA) and ray_map.fallbacks == 0


def test_the_engines_refusal_comes_back_as_it_is(ray_map: RayModuleMap) -> None:
    """FedIT refuses mixed ranks inside a module's job: the same RankError as in process (so
    the publisher's quarantine logic sees what it would in process), and no fallback."""
    strategy = make_strategy("fedit", StrategyConfig(schema=SCHEMA, max_rank=8))
    mixed = uploads(SCHEMA, [2, 4], 3)
    with pytest.raises(RankError) as here:
        strategy.aggregate(strategy.initial_state(), mixed)
    with pytest.raises(RankError) as there:
        strategy.aggregate(strategy.initial_state(), mixed, map_modules=ray_map)
    assert type(there.value) is RankError and there.value.field == "rank"
    assert str(there.value) == str(here.value)  # no worker traceback, pid or path in it
    assert ray_map.fallbacks == 0 and ray_map.tasks == len(SCHEMA)


def test_a_cluster_too_slow_to_answer_costs_time_not_the_round(ray_head: RayCluster) -> None:
    slow = RayModuleMap(ray_head.gcs_address, task_timeout_seconds=1e-6)
    slow.connect()
    reasons: list[str] = []
    slow.on_fallback = reasons.append
    strategy = make_strategy("raflora", StrategyConfig(schema=SCHEMA, max_rank=8))
    round1 = uploads(SCHEMA, [2, 4, 8], 1)
    got = strategy.aggregate(strategy.initial_state(), round1, map_modules=slow)
    want = strategy.aggregate(strategy.initial_state(), round1)
    assert relative_gap(got, want) == 0.0  # run here, in this process, as `want` was
    assert slow.fallbacks == 1 and "took longer than" in reasons[0], reasons
    # Rested: the next round runs in process at once, without waiting on the cluster again.
    tasks = slow.tasks
    again = strategy.aggregate(strategy.initial_state(), round1, map_modules=slow)
    assert relative_gap(again, want) == 0.0
    assert slow.tasks == tasks and slow.fallbacks == 2 and "left alone" in reasons[1], reasons


# -- through the real server -----------------------------------------------------------------

MODULES = {"layers.0.q": (48, 32), "layers.0.v": (32, 48), "layers.1.q": (48, 32)}
RANKS = (2, 4, 8)
# Both servers close one-shot: a round closed from its running sums (rounds/summing.py, tested
# in test_round_sums_service) is another float32 summation order, and runs in the server
# process, not on the cluster, so it is neither the round compared here nor a Ray task.
ONE_SHOT = {"round_sums_memory_mib": 0}
ONE_SHOT_ENV = {"RAFLORA_ROUND_SUMS_MEMORY_MIB": "0"}


def client_adapter(modules: dict[str, tuple[int, int]], rank: int, seed: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return lora_state_dict({m: decaying(o, i, rank, g) for m, (o, i) in modules.items()})


def run_round(
    target: str, federation: str, modules: dict[str, tuple[int, int]], ranks: Sequence[int]
) -> list[RafloraClient]:
    """Create the federation, push every client's adapter, and wait for round 1."""
    with AdminClient(target) as admin:
        admin.create_federation(
            every_client_spec(federation, modules, len(ranks), max_rank=max(ranks))
        )
    clients = []
    for i, rank in enumerate(ranks):
        client = RafloraClient(target, federation, f"c{i}")
        client.join(rank=rank, num_examples=10 + 5 * i, lora_alpha=16.0)
        clients.append(client)
    for i, (client, rank) in enumerate(zip(clients, ranks, strict=True)):
        client.push(client_adapter(modules, rank, seed=100 + i), round=0, num_examples=10 + 5 * i)
    assert clients[0].wait_for_round(0, timeout=120).round == 1
    return clients


def counter(metrics_url: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", scrape(metrics_url), re.MULTILINE)
    assert match, f"{name} is not exported"
    return float(match.group(1))


def dense(tensors: dict[str, Tensor], module: str) -> Tensor:
    return tensors[f"{module}.lora_B.weight"] @ tensors[f"{module}.lora_A.weight"]


def published(server: ThreadedServer, federation: str) -> GlobalState:
    state = server.server.hub.get(federation).state
    assert state.round == 1
    return state


def test_a_federation_on_ray_publishes_the_in_process_round(
    ray_head: RayCluster, tmp_path: Path
) -> None:
    with (
        threaded_server(tmp_path / "ray", ray_address=ray_head.gcs_address, **ONE_SHOT) as on_ray,
        threaded_server(tmp_path / "here", **ONE_SHOT) as here,
        torch_threads(1),
    ):
        for server in (on_ray, here):
            for client in run_round(server.target, "fed", MODULES, RANKS):
                client.close()
        assert relative_gap(published(on_ray, "fed"), published(here, "fed")) <= 1e-6
        assert counter(on_ray.metrics_url, "raflora_ray_tasks_total") == len(MODULES)
        assert counter(on_ray.metrics_url, "raflora_ray_fallbacks_total") == 0
        assert counter(here.metrics_url, "raflora_ray_tasks_total") == 0


def test_a_worker_killed_mid_round_is_retried_and_the_round_is_right(
    ray_head: RayCluster, tmp_path: Path
) -> None:
    """A server process of its own joins the cluster through Ray Client (ray://, the
    Kubernetes layout); while the round's tasks run, one worker is SIGKILLed. Ray re-runs the
    task: round 1 is published once, equal to the in-process round, and no round fell back
    to in-process. (That the kill lands before the task's result is stored is likely, the
    tasks take ~1 s, but not proven: the assertions hold either way.)"""
    heavy = {f"layers.{i}.q": (1536, 1536) for i in range(4)}
    ranks = (64, 32, 64, 16, 64, 64)
    killed: list[int] = []
    stop = threading.Event()

    def killer() -> None:
        while not stop.is_set() and not killed:
            for pid in running_tasks(ray_head):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.005)

    server = start_server_process(
        tmp_path / "ray",
        tmp_path / "ray.log",
        env={**RAY_ENV, "RAFLORA_RAY_ADDRESS": ray_head.client_address, **ONE_SHOT_ENV},
        timeout=120,
    )
    watcher = threading.Thread(target=killer, daemon=True)
    with ExitStack() as stack:
        stack.callback(server.stop)
        stack.callback(stop.set)
        watcher.start()
        for client in run_round(server.target, "fed", heavy, ranks):
            stack.callback(client.close)
        stop.set()
        watcher.join(5)
        assert killed, "no module job was seen running: nothing was killed"
        assert counter(server.metrics_url, "raflora_ray_fallbacks_total") == 0
        assert counter(server.metrics_url, "raflora_ray_tasks_total") == len(heavy)
        puller = stack.enter_context(RafloraClient(server.target, "fed", "c0"))
        got = puller.pull()
        assert got.round == 1
        with threaded_server(tmp_path / "here", **ONE_SHOT) as here, torch_threads(1):
            for client in run_round(here.target, "fed", heavy, ranks):
                stack.callback(client.close)
            want = RafloraClient(here.target, "fed", "c0")
            stack.callback(want.close)
            reference = want.pull()
        for module in heavy:
            want_dw = dense(reference.tensors, module)
            gap = (dense(got.tensors, module) - want_dw).norm() / want_dw.norm()
            assert gap <= 1e-6, (module, float(gap))
    log = (tmp_path / "ray.log").read_text()
    assert "aggregating modules on the Ray cluster" in log, log[-2000:]


def test_a_server_that_cannot_reach_its_ray_cluster_says_so(tmp_path: Path) -> None:
    with ExitStack() as stack:
        closed = stack.enter_context(socket.socket())
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        address = f"127.0.0.1:{closed.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(RuntimeError):
            start_server_process(
                tmp_path / "d",
                tmp_path / "server.log",
                env={"RAFLORA_RAY_ADDRESS": address},
                timeout=60,
            )
        assert time.monotonic() - started < 30  # not ray.init's minutes of retrying
    log = (tmp_path / "server.log").read_text()
    assert f"ray_address: cannot use {address}: nothing answers at {address}" in log, log
    assert "Traceback" not in log


class FlakyJoin:
    """ray.init standing in for a Ray Client join: Ray's client-server race cannot be made to
    happen on demand, so these tests give the retry the failures the proxier raises."""

    def __init__(self, failures: Sequence[Exception]) -> None:
        self.failures = list(failures)
        self.calls = 0
        self.shutdowns = 0

    def init(self) -> None:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)

    def shutdown(self) -> None:
        self.shutdowns += 1


def race() -> Exception:
    # the text Ray 2.60's client raises when its proxier's specific server dies at start
    return ConnectionAbortedError(
        f"Initialization failure from server:\nTraceback ...\nRuntimeError: "
        f"{CLIENT_SERVER_RACE}. See ray_client_server_23000.err for detailed logs."
    )


def test_a_join_lost_to_rays_client_server_race_is_tried_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    join = FlakyJoin([race()])
    with caplog.at_level("WARNING", logger="raflora.server"):
        join_retrying(join.init, join.shutdown, "ray://head:10001")
    assert (join.calls, join.shutdowns) == (2, 1)
    assert "joining the Ray cluster ray://head:10001" in caplog.text
    assert "joining again (2 of 3)" in caplog.text


def zombie() -> Exception:
    # the same race as Ray 2.60's client raised it in CI, one step earlier in the proxier
    return ConnectionAbortedError(
        "Initialization failure from server: Traceback (most recent call last): File "
        '"ray/util/client/server/proxier.py", line 396, in start_specific_server cmd = '
        "psutil_proc.cmdline() ... psutil.ZombieProcess: PID still exists but it's a zombie "
        "(pid=21585)"
    )


def test_a_join_whose_client_server_turned_zombie_is_tried_again() -> None:
    join = FlakyJoin([zombie(), race()])
    join_retrying(join.init, join.shutdown, "ray://head:10001")
    assert (join.calls, join.shutdowns) == (3, 2)


def test_a_join_refused_for_another_reason_is_not_tried_again() -> None:
    refused = ConnectionAbortedError("AuthenticationError: the token does not match")
    join = FlakyJoin([refused, race()])
    with pytest.raises(ConnectionAbortedError) as caught:
        join_retrying(join.init, join.shutdown, "ray://head:10001")
    assert caught.value is refused and join.calls == 1


def test_a_race_that_keeps_happening_gives_up_after_the_last_attempt() -> None:
    join = FlakyJoin([race(), race(), race(), race()])
    with pytest.raises(ConnectionAbortedError, match=CLIENT_SERVER_RACE):
        join_retrying(join.init, join.shutdown, "ray://head:10001", attempts=3)
    assert (join.calls, join.shutdowns) == (3, 2)


def test_a_cluster_with_token_authentication_takes_only_a_server_with_its_token(
    tmp_path: Path,
) -> None:
    """components/ray turns on Ray's token authentication (RAY_AUTH_MODE=token): a server
    with the cluster's token joins it through Ray Client and runs its probe task there; one
    without is refused at start with one line naming ray_address."""
    token = os.urandom(32).hex()
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    with ray_cluster(cpus=1, env=auth) as cluster:
        address = {"RAFLORA_RAY_ADDRESS": cluster.client_address}
        with start_server_process(
            tmp_path / "with", tmp_path / "with.log", env={**address, **auth}, timeout=90
        ) as server:
            assert server.running
        joined = (tmp_path / "with.log").read_text()
        assert f"aggregating modules on the Ray cluster {cluster.client_address}" in joined
        with pytest.raises(RuntimeError):
            start_server_process(
                tmp_path / "without",
                tmp_path / "without.log",
                # An empty HOME: no ~/.ray/auth_token of an earlier local run stands in.
                env={
                    **address,
                    "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": "",
                    "HOME": str(tmp_path / "home"),
                },
                timeout=90,
            )
    refused = (tmp_path / "without.log").read_text()
    assert f"ray_address: cannot use {cluster.client_address}" in refused, refused
    assert "AuthenticationError" in refused and "Traceback" not in refused, refused


def test_local_mode_starts_a_cluster_inside_the_server(tmp_path: Path) -> None:
    """``ray_address = local``: the server starts a one-machine cluster of its own (for trying
    the mode), aggregates on it, and takes it down when it stops."""
    token = Path.home() / ".ray" / "auth_token"
    before = token.stat().st_mtime_ns if token.exists() else None
    env = {**RAY_ENV, "RAFLORA_RAY_ADDRESS": "local", **ONE_SHOT_ENV}
    server = start_server_process(tmp_path / "d", tmp_path / "local.log", env=env, timeout=120)
    with ExitStack() as stack:
        stack.callback(server.stop)
        for client in run_round(server.target, "fed", MODULES, RANKS):
            stack.callback(client.close)
        assert counter(server.metrics_url, "raflora_ray_tasks_total") == len(MODULES)
        assert counter(server.metrics_url, "raflora_ray_fallbacks_total") == 0
    log = (tmp_path / "local.log").read_text()
    assert "aggregating modules on the Ray cluster local" in log, log[-2000:]
    assert not running_tasks()  # the server's own cluster went with it
    after = token.stat().st_mtime_ns if token.exists() else None
    assert after == before  # nothing written to $HOME/.ray


def test_ray_needs_the_cpu_device(tmp_path: Path) -> None:
    """Module tasks run on the workers' CPUs: a GPU server with ray_address is refused at
    start with one line naming the setting, before any cluster is contacted."""
    from raflora.server.app import open_module_map
    from raflora.server.metrics import ServerMetrics
    from raflora.server.settings import ConfigError, ServerSettings

    settings = ServerSettings(data_dir=tmp_path, device="cuda:0", ray_address="127.0.0.1:1")
    with pytest.raises(ConfigError, match=r"^ray_address: .*set device=cpu"):
        open_module_map(settings, ServerMetrics(0.9))


# -- hostile clients of a federation that aggregates on Ray ------------------------------------


@pytest.fixture(scope="module")
def ray_server(
    ray_head: RayCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ThreadedServer]:
    with threaded_server(
        tmp_path_factory.mktemp("ray-hostile"),
        ray_address=ray_head.gcs_address,
        max_pushes_per_round=64,
        **ONE_SHOT,
    ) as handle:
        yield handle


@pytest.mark.parametrize("attack", POISON, ids=[a.name for a in POISON])
def test_a_poisoned_upload_is_refused_before_the_cluster_and_the_round_goes_on(
    ray_server: ThreadedServer, attack: Attack
) -> None:
    """The trust-boundary suite's attacks (NaN, Inf, overflow, norm past the bound, absurd
    examples or alpha) against a server that aggregates on Ray: each is refused at intake with
    its documented status, and the honest clients' round is published through the cluster."""
    tasks = counter(ray_server.metrics_url, "raflora_ray_tasks_total")
    run_attack(ray_server, f"ray-{attack.name}", attack, POISON_TRUST)
    assert counter(ray_server.metrics_url, "raflora_ray_tasks_total") > tasks
    assert counter(ray_server.metrics_url, "raflora_ray_fallbacks_total") == 0


def test_a_whale_on_ray_is_capped_at_its_share(ray_server: ThreadedServer) -> None:
    tasks = counter(ray_server.metrics_url, "raflora_ray_tasks_total")
    whale_is_capped(ray_server)
    assert counter(ray_server.metrics_url, "raflora_ray_tasks_total") > tasks
