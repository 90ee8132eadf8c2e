"""Module-sharded aggregation on a Ray cluster (docs/design.md §5.2).

Every module of a round is one Ray task: the server's aggregation thread validates the round,
ships each task its module's slice (:meth:`Strategy.module_jobs`) and gathers the results in
order. Ray re-runs a task whose worker died (``max_retries``). Anything else going wrong with
the cluster (unreachable, too slow, a worker that cannot unpickle the job) makes that round
run in process instead: an outage slows rounds down and never loses one, and only the
in-process engine ever decides that an upload is at fault (and so is quarantined).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from raflora.server.engine import AggregationError, GlobalState, ModuleJob, Strategy, run_here
from raflora.server.engine.strategies import PreparedRound

log = logging.getLogger("raflora.server")

#: ``ray_address`` meaning "start a Ray cluster inside this server" (one machine; trials).
LOCAL = "local"


class RayUnavailableError(RuntimeError):
    """The Ray cluster named by ``ray_address`` cannot be used; the message says why."""


def unreachable(address: str, timeout_seconds: float = 5.0) -> str | None:
    """Why ``address`` (HOST:PORT or ray://HOST:PORT) takes no TCP connection, if it does not.

    ray.init waits minutes on an address nobody listens at; this answers in seconds.
    """
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return None  # "auto" and the like: Ray resolves them itself
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_seconds):
            return None
    except OSError as exc:
        return f"nothing answers at {target}: {exc}"


#: What Ray Client's proxier says when the server it forks for a new driver did not come up.
#: Ray 2.60 races there (the fork can die while the proxier reads its command line, seen on a
#: fresh head's first driver); the next driver gets a fresh server, so joining again works.
CLIENT_SERVER_RACE = "Starting Ray client server failed"
#: The same race caught one step earlier: the proxier's psutil finds the fork a zombie while
#: reading its command line (seen in CI: "Initialization failure from server: ...
#: psutil.ZombieProcess: PID still exists but it's a zombie").
CLIENT_SERVER_ZOMBIE = "ZombieProcess"


def join_retrying(
    init: Callable[[], object],
    shutdown: Callable[[], object],
    address: str,
    attempts: int = 3,
) -> None:
    """``init()``, again (after ``shutdown()``) while it fails with :data:`CLIENT_SERVER_RACE`
    or :data:`CLIENT_SERVER_ZOMBIE`; any other failure (refused token, wrong version) is
    final at once."""
    for attempt in range(1, attempts + 1):
        try:
            init()
            return
        except Exception as exc:
            raced = CLIENT_SERVER_RACE in str(exc) or CLIENT_SERVER_ZOMBIE in str(exc)
            if not raced or attempt == attempts:
                raise
            log.warning(
                "joining the Ray cluster %s: its client server did not start a session for "
                "this server (%s); joining again (%d of %d)",
                address,
                type(exc).__name__,
                attempt + 1,
                attempts,
            )
            with contextlib.suppress(Exception):
                shutdown()


def raflora_aggregate_module(
    strategy: Strategy, name: str, state: GlobalState, round_: PreparedRound
) -> Any:
    """The task body (its name is the worker's process title while it runs: ray::raflora_…)."""
    return ModuleJob(strategy, name, state, round_).run()


TensorWire = tuple[str, tuple[int, ...], Any]


def tensor_to_wire(tensor: torch.Tensor) -> TensorWire:
    """A tensor as (dtype, shape, its bytes as a uint8 NumPy array): Ray moves NumPy arrays
    out of band into its object store, where torch's own pickling copies every byte twice
    through Python (measured in bench/bench_ray.py)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    data = flat.view(torch.uint8).numpy()
    return str(flat.dtype).removeprefix("torch."), tuple(tensor.shape), data


def tensor_from_wire(wire: TensorWire) -> torch.Tensor:
    dtype, shape, data = wire
    if data.size == 0:  # e.g. round 0's rank-0 state: nothing to view
        return torch.empty(shape, dtype=getattr(torch, dtype))
    # The array is a read-only view of the object store: copy it, the engine owns its tensors.
    return torch.from_numpy(data.copy()).view(getattr(torch, dtype)).reshape(shape)


def raflora_version() -> str:
    """What a worker has installed: the cluster must run the server's own engine."""
    return importlib.metadata.version("raflora")


class RayModuleMap:
    """A :data:`~raflora.server.engine.ModuleMap` that runs module jobs as Ray tasks."""

    def __init__(
        self,
        address: str,
        *,
        task_timeout_seconds: float = 900.0,
        max_retries: int = 3,
        cpus_per_task: float = 1.0,
        retry_after_seconds: float = 60.0,
        on_tasks: Callable[[int], None] | None = None,
        on_fallback: Callable[[str], None] | None = None,
    ) -> None:
        self.address = address
        self.task_timeout_seconds = task_timeout_seconds
        self.max_retries = max_retries
        self.cpus_per_task = cpus_per_task
        self.retry_after_seconds = retry_after_seconds
        self.on_tasks = on_tasks
        self.on_fallback = on_fallback
        self.tasks = 0  # submitted to the cluster
        self.fallbacks = 0  # rounds run in process instead
        self._started_here = False
        self._task: Any = None
        self._lock = threading.Lock()
        # After a failure the cluster is left alone until then (rounds run in process), so an
        # outage costs each round nothing rather than a timeout; then it is joined afresh.
        self._resting_until = 0.0
        self._rejoin = False

    def connect(self, timeout_seconds: float = 60.0) -> str:
        """Join the cluster and check that its workers run this raflora; returns a summary."""
        try:
            import ray
        except ImportError:
            raise RayUnavailableError(
                "the ray package is not installed (pip install 'raflora[ray]')"
            ) from None
        options: dict[str, Any] = {
            "namespace": "raflora",
            "logging_level": logging.WARNING,
            "log_to_driver": False,
        }
        if not ray.is_initialized() and self.address != LOCAL:
            problem = unreachable(self.address)
            if problem is not None:
                raise RayUnavailableError(f"{self.address}: {problem}")
        try:
            if not ray.is_initialized():
                if self.address == LOCAL:
                    # "local": a cluster of its own, never one RAY_ADDRESS or /tmp/ray names
                    ray.init(address="local", include_dashboard=False, **options)
                else:
                    join_retrying(
                        lambda: ray.init(address=self.address, **options),
                        ray.shutdown,
                        self.address,
                    )
                self._started_here = True
            if not self.address.startswith("ray://"):  # Ray Client pickles on its own
                ray.util.register_serializer(
                    torch.Tensor, serializer=tensor_to_wire, deserializer=tensor_from_wire
                )
            self._task = ray.remote(
                num_cpus=self.cpus_per_task, max_retries=self.max_retries, retry_exceptions=False
            )(raflora_aggregate_module)
            probe = ray.remote(num_cpus=0)(raflora_version)
            theirs = ray.get(probe.remote(), timeout=timeout_seconds)
        except Exception as exc:
            raise RayUnavailableError(f"{self.address}: {type(exc).__name__}: {exc}") from None
        ours = raflora_version()
        if theirs != ours:
            raise RayUnavailableError(
                f"{self.address}: its workers run raflora {theirs}, this server {ours}; run "
                "the server's image on the cluster"
            )
        cpus = ray.cluster_resources().get("CPU", 0)  # type: ignore[no-untyped-call]
        return f"{self.address} ({cpus:g} CPUs, raflora {ours})"

    def close(self) -> None:
        if self._started_here:
            import ray

            ray.shutdown()
            self._started_here = False

    def _available(self) -> tuple[str, bool] | None:
        """None when the cluster may be used now; else why the round runs in process, and
        whether that is a new failure (which starts another rest)."""
        with self._lock:
            resting = time.monotonic() < self._resting_until
            rejoin, self._rejoin = (False, self._rejoin) if resting else (self._rejoin, False)
        if resting:
            return "the cluster failed a recent round and is left alone for a while", False
        if rejoin and self._started_here:  # e.g. a Ray Client whose reconnect window ran out
            import ray

            with contextlib.suppress(Exception):
                ray.shutdown()
            self._started_here = False
            try:
                log.info("rejoined the Ray cluster %s", self.connect(timeout_seconds=30.0))
            except RayUnavailableError as exc:
                return f"rejoining it failed: {exc}", True
        return None

    def _rest(self, rejoin: bool) -> None:
        with self._lock:
            self._resting_until = time.monotonic() + self.retry_after_seconds
            self._rejoin = self._rejoin or rejoin

    def __call__(self, jobs: Sequence[ModuleJob]) -> list[Any]:
        if not jobs:
            return []
        unavailable = self._available()
        if unavailable is not None:
            reason, failed = unavailable
            return self._in_process(jobs, reason, failed=failed, rejoin=True)
        import ray
        from ray.exceptions import GetTimeoutError, RayTaskError

        refs: list[Any] = []
        rejoin = False
        try:
            # one copy of each strategy in the object store, however many modules use it
            unique = {id(job.strategy): job.strategy for job in jobs}
            strategies = {key: ray.put(strategy) for key, strategy in unique.items()}
            refs = [
                self._task.remote(strategies[id(job.strategy)], job.name, job.state, job.round)
                for job in jobs
            ]
            with self._lock:
                self.tasks += len(refs)
            if self.on_tasks is not None:
                self.on_tasks(len(refs))
            return list(ray.get(refs, timeout=self.task_timeout_seconds))
        except RayTaskError as exc:
            if isinstance(exc.cause, AggregationError):
                # the engine refused the data, as it would here: its own error and message
                raise exc.cause from None
            reason = f"a task failed: {type(exc.cause).__name__}: {exc.cause}"
        except GetTimeoutError:
            reason = f"the tasks took longer than {self.task_timeout_seconds:g} s"
        except Exception as exc:  # the cluster itself: connection lost, workers gone, ...
            reason = f"{type(exc).__name__}: {exc}"
            rejoin = True
        # The round's other tasks are left to finish on the cluster and their results are
        # dropped with ``refs``: force-cancelling one as it completed tripped a check in
        # Ray's task manager that aborts this process, the server (docs/design.md §5.2).
        return self._in_process(jobs, reason, failed=True, rejoin=rejoin)

    def _in_process(
        self, jobs: Sequence[ModuleJob], reason: str, *, failed: bool, rejoin: bool
    ) -> list[Any]:
        if failed:
            self._rest(rejoin)
        with self._lock:
            self.fallbacks += 1
        log.warning(
            "aggregation on Ray (%s) is not used for this round (%s); its %d modules run in "
            "process; the cluster is tried again once %g s have passed since it failed",
            self.address,
            reason,
            len(jobs),
            self.retry_after_seconds,
        )
        if self.on_fallback is not None:
            self.on_fallback(reason)
        return run_here(jobs)
