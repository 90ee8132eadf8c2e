"""``raflora-demo``: the service plus a real federation a newcomer can watch.

Starts ``raflora-server`` with its embedded defaults, creates one federation per strategy
(FlexLoRA, the paper's raFLoRA and the project's default ``raflora_ha``) over all-MiniLM-L6-v2's
query/value projections and launches one separate process per client (ranks 2, 2, 4, 4, 16, 16
on Dirichlet label-skewed shards of BBC News); each client takes part in every federation in
lockstep, so the strategies train on identical clients and the model is loaded once. With
``--participation F`` the server selects a fraction F of the clients each round (seeded;
``--stratify`` keeps every rank represented) and only those train. After every round it pulls
the global adapter, measures held-out accuracy and loss, and reads the rank-energy metrics the
server publishes; a progress line with an ETA comes at least every 30 s. Ends with a table, a
JSON report and a PNG plot.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raflora.client_sdk import AdminClient, RafloraClient, pb
from raflora.client_sdk.peft_adapter import adapter_shapes, load_pulled_adapter
from raflora.server.testing import ServerProcess, python_env

from . import data as datasets
from .model import LoraClassifier, evaluate, tokenize
from .report import RoundResult, plot, table, write_json


@dataclass(frozen=True)
class DemoConfig:
    dataset: str
    strategies: list[str]
    rounds: int
    ranks: list[int]
    dirichlet: float
    local_steps: int
    batch_size: int
    lr: float
    test_size: int
    max_length: int
    seed: int
    out: Path
    participation: float = 1.0
    stratify: bool = False


def parse_args(argv: Sequence[str] | None) -> DemoConfig:
    p = argparse.ArgumentParser(
        prog="raflora-demo", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    sizes = p.add_mutually_exclusive_group()
    sizes.add_argument("--quick", action="store_true", help="3 short rounds (the CI smoke test)")
    sizes.add_argument(
        "--full", action="store_true", help="12 rounds of 8 local steps (docs/demo.md's run)"
    )
    p.add_argument("--dataset", choices=sorted(datasets.LOADERS), default="bbc")
    p.add_argument("--strategies", default="flexlora,raflora,raflora_ha")
    p.add_argument("--rounds", type=int)
    p.add_argument("--ranks", default="2,2,4,4,16,16", help="one client per entry")
    p.add_argument("--dirichlet", type=float, default=0.5, help="label skew; inf = IID")
    p.add_argument("--local-steps", type=int)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--test-size", type=int)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--participation",
        type=float,
        default=1.0,
        help="fraction of clients the server selects each round (1: everyone)",
    )
    p.add_argument("--stratify", action="store_true", help="stratify the selection by rank")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("out/demo"),
        help="output directory; an earlier demo's output there is replaced, anything else "
        "is refused",
    )
    a = p.parse_args(argv)
    if not 0 < a.participation <= 1:
        p.error(f"--participation must be in (0, 1], got {a.participation}")
    size = "quick" if a.quick else "full" if a.full else "default"
    rounds, steps, test_size = {"quick": (3, 4, 150), "default": (5, 4, 200), "full": (12, 8, 400)}[
        size
    ]
    return DemoConfig(
        dataset=a.dataset,
        strategies=[s for s in a.strategies.split(",") if s],
        rounds=a.rounds or rounds,
        ranks=[int(r) for r in a.ranks.split(",")],
        dirichlet=a.dirichlet,
        local_steps=a.local_steps or steps,
        batch_size=a.batch_size,
        lr=a.lr,
        test_size=a.test_size or test_size,
        max_length=a.max_length,
        seed=a.seed,
        out=a.out,
        participation=a.participation,
        stratify=a.stratify,
    )


def participation_policy(
    fraction: float, stratify: bool, seed: int
) -> pb.ParticipationPolicy | None:
    """The server-side sampling policy for ``fraction`` of the clients; None for everyone."""
    if fraction >= 1:
        return None
    return pb.ParticipationPolicy(fraction=fraction, stratify_by_rank=stratify, seed=seed)


def round_policy(clients: int) -> pb.RoundPolicy:
    """Close at every client's upload (or at the selection's quota); draw over all of them."""
    return pb.RoundPolicy(min_clients=1, expected_clients=clients)


def spawn_trainer(
    target: str,
    federations: Sequence[str],
    client_id: str,
    rank: int,
    shard_file: Path,
    log_path: Path,
    *,
    dataset: str,
    rounds: int,
    local_steps: int,
    batch_size: int,
    lr: float,
    max_length: int,
    seed: int,
    attack: str = "none",
) -> subprocess.Popen[bytes]:
    """One client process (``raflora.demo.trainer``) with ``lora_alpha = 2r``, logging to a file."""
    cmd = [
        sys.executable,
        "-m",
        "raflora.demo.trainer",
        "--target",
        target,
        "--client-id",
        client_id,
        "--rank",
        str(rank),
        "--lora-alpha",
        str(2 * rank),
        "--shard-file",
        str(shard_file),
        "--dataset",
        dataset,
        "--rounds",
        str(rounds),
        "--local-steps",
        str(local_steps),
        "--batch-size",
        str(batch_size),
        "--lr",
        str(lr),
        "--max-length",
        str(max_length),
        "--seed",
        str(seed),
        "--attack",
        attack,
    ]
    for federation in federations:
        cmd += ["--federation", federation]
    env = python_env(extra_dirs=("demo",))  # the trainer imports raflora.demo too
    with log_path.open("wb") as log:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def delta_norm(model: LoraClassifier) -> float:
    """‖ΔW‖_F over all adapted modules, from the factors (s·B·A) of the evaluator's view."""
    from peft.tuners.lora import LoraLayer

    total = 0.0
    for module in model.encoder.modules():
        if isinstance(module, LoraLayer):
            layer: Any = module
            A = layer.lora_A["default"].weight.detach().double()
            B = layer.lora_B["default"].weight.detach().double()
            s = float(layer.scaling["default"])
            total += float(((B.T @ B) * (A @ A.T)).sum()) * s * s
    return float(total**0.5)


class Progress:
    """A console line at least every ``every`` seconds, with an ETA from the rounds so far."""

    def __init__(self, total_steps: int, every: float = 25.0) -> None:
        self.total = total_steps
        self.done = 0
        self.every = every
        self.started = time.perf_counter()
        self._first: float | None = None  # when the first step ended: start-up excluded

    def step(self) -> None:
        self.done += 1
        if self.done == 1:
            self._first = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def eta(self) -> str:
        if self._first is None:
            return "ETA after the first round"
        if self.done == 1:
            per_step = self._first - self.started
        else:
            per_step = (time.perf_counter() - self._first) / (self.done - 1)
        return f"ETA {_minutes(per_step * (self.total - self.done))}"


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def run_federations(
    cfg: DemoConfig,
    server: ServerProcess,
    ds: datasets.Dataset,
    test_idx: np.ndarray,
) -> dict[str, list[RoundResult]]:
    """One federation per strategy; the same client processes train in all of them."""
    R = max(cfg.ranks)
    evaluator = LoraClassifier(R, 2 * R, ds.prompts, cfg.max_length)
    test = tokenize(evaluator, [ds.texts[i] for i in test_idx], ds.labels[test_idx])
    shapes = adapter_shapes(evaluator.encoder)
    feds = {s: f"demo-{s}".replace("_", "-") for s in cfg.strategies}
    with AdminClient(server.target) as admin:
        for strategy, federation in feds.items():
            admin.create_federation(
                pb.FederationSpec(
                    federation_id=federation,
                    modules=[
                        pb.ModuleSpec(name=n, d_out=o, d_in=i) for n, (o, i) in shapes.items()
                    ],
                    strategy=strategy,
                    max_rank=R,
                    lora_alpha=2 * R,
                    init_seed=cfg.seed,
                    round_policy=round_policy(len(cfg.ranks)),
                    participation=participation_policy(cfg.participation, cfg.stratify, cfg.seed),
                )
            )
    logs = cfg.out / "logs"
    clients = [
        spawn_trainer(
            server.target,
            list(feds.values()),
            f"client-{k}",
            rank,
            cfg.out / "shards" / f"client-{k}.json",
            logs / f"client-{k}.log",
            dataset=cfg.dataset,
            rounds=cfg.rounds,
            local_steps=cfg.local_steps,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            max_length=cfg.max_length,
            seed=cfg.seed + k,
        )
        for k, rank in enumerate(cfg.ranks)
    ]
    print(
        f"{len(clients)} client processes started (logs in {logs}); they load the model, "
        "then train in every federation each round",
        flush=True,
    )
    models = {s: evaluator if i == 0 else copy.deepcopy(evaluator) for i, s in enumerate(feds)}
    results: dict[str, list[RoundResult]] = {s: [] for s in feds}
    progress = Progress(cfg.rounds * len(feds))
    observers = {s: RafloraClient(server.target, f, "evaluator") for s, f in feds.items()}
    try:
        for obs in observers.values():
            obs.join(rank=R, num_examples=0, lora_alpha=2 * R, observer=True)
        for t in range(cfg.rounds + 1):
            for strategy, obs in observers.items():
                if t > 0:
                    wait_for_round(obs, t - 1, clients, logs, strategy, progress)
                    progress.step()
                pulled = obs.pull(round=t)
                model = models[strategy]
                load_pulled_adapter(model.encoder, pulled)
                accuracy, loss = evaluate(model, test)
                energy = pulled.energy
                result = RoundResult(
                    round=pulled.round,
                    accuracy=accuracy,
                    loss=loss,
                    e_min=energy.e_min if pulled.round else float("nan"),
                    effective_rank=energy.effective_rank,
                    partition_energy=list(energy.partition_energy),
                    delta_norm=delta_norm(model),
                    seconds=progress.elapsed(),
                )
                results[strategy].append(result)
                print(
                    f"[{strategy:>10}] round {result.round:>2}/{cfg.rounds}  "
                    f"acc {accuracy:.3f}  loss {loss:.3f}  E_min {result.e_min:.3f}  "
                    f"eff.rank {result.effective_rank:5.2f}  |dW| {result.delta_norm:.3f}  "
                    f"({_minutes(result.seconds)}, {progress.eta()})",
                    flush=True,
                )
        for proc in clients:
            if proc.wait(120) != 0:
                raise RuntimeError(f"a client failed; see {logs}")
    finally:
        for obs in observers.values():
            obs.close()
        for proc in clients:
            if proc.poll() is None:
                proc.kill()
    return results


def wait_for_round(
    observer: RafloraClient,
    after: int,
    clients: list[subprocess.Popen[bytes]],
    logs: Path,
    label: str,
    progress: Progress | None = None,
) -> None:
    """Block on the watch stream; every ~20 s check the clients are alive and say where we are."""
    from raflora.client_sdk import DeadlineExceededError

    while True:
        try:
            observer.wait_for_round(after, timeout=20)
            return
        except DeadlineExceededError:
            dead = [p for p in clients if p.poll() not in (None, 0)]
            if dead:
                raise RuntimeError(f"a client of {label} exited early; see {logs}") from None
            if progress is not None:
                status = observer.status()
                print(
                    f"[{label:>10}] round {after}: {status.uploads} of "
                    f"{status.expected_clients} uploads so far  ({_minutes(progress.elapsed())}"
                    f", {progress.eta()})",
                    flush=True,
                )


MARKER = ".raflora-demo"


def prepare_out(out: Path) -> None:
    """Replace an earlier demo's output; never delete a directory the demo did not create."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise SystemExit(
                f"raflora-demo: {out} exists and was not made by raflora-demo; "
                "choose another --out or empty it yourself"
            )
        print(f"replacing the earlier demo output in {out}", flush=True)
        shutil.rmtree(out)
    for sub in ("shards", "logs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by raflora-demo; --out replaces this directory\n")


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    prepare_out(cfg.out)
    ds = datasets.load(cfg.dataset)
    train_idx, test_idx = datasets.held_out_split(ds.labels, cfg.test_size, cfg.seed)
    shards = [
        train_idx[s]
        for s in datasets.dirichlet_shards(
            ds.labels[train_idx], len(cfg.ranks), cfg.dirichlet, cfg.seed
        )
    ]
    for k, shard in enumerate(shards):
        (cfg.out / "shards" / f"client-{k}.json").write_text(json.dumps(shard.tolist()))
    print(
        f"dataset {ds.name}: {len(ds.texts)} examples, {len(ds.classes)} classes; held-out "
        f"{len(test_idx)}; {len(shards)} clients of ranks {cfg.ranks} on Dirichlet("
        f"{cfg.dirichlet}) shards of sizes {[len(s) for s in shards]}",
        flush=True,
    )
    # The server's own defaults (host, device: CUDA when there is one), its log in logs/; it
    # is stopped (SIGTERM, SIGKILL after 30 s) however the run ends.
    with ServerProcess(
        cfg.out / "server-data", cfg.out / "logs" / "server.log", host=None, device=None
    ) as server:
        print(f"raflora-server on {server.target}, metrics on {server.metrics_url}", flush=True)
        results = run_federations(cfg, server, ds, test_idx)
    print()
    print(table(results))
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.__dict__.items()}
    config["shard_sizes"] = [len(s) for s in shards]
    write_json(cfg.out / "report.json", config, results)
    plot(
        cfg.out / "report.png",
        results,
        f"{ds.name}: ranks {cfg.ranks}, Dirichlet({cfg.dirichlet}), seed {cfg.seed}",
    )
    print(f"\nreport: {cfg.out / 'report.json'}  plot: {cfg.out / 'report.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
