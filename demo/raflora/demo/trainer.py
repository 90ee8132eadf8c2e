"""One federated client: a separate process that fine-tunes MiniLM with LoRA at its own rank.

It speaks to the server only through the client SDK: join, then each round pull the global
adapter at its rank into its PeftModel, train a few steps on its private shard, push, and block
on the watch stream until the next round is published. Under a participation policy it trains
only in the rounds it is selected for and otherwise just waits for the next round. Given
several ``--federation`` flags it takes part in all of them in lockstep with one model per
federation (the evaluation harness compares strategies on identical clients this way, loading
the model once).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from raflora.client_sdk import FailedPreconditionError, RafloraClient, is_selected
from raflora.client_sdk.peft_adapter import adapter_state, load_pulled_adapter

from . import data as datasets
from .model import Batch, LoraClassifier, tokenize, train_steps


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--target", required=True)
    p.add_argument("--federation", action="append", required=True)
    p.add_argument("--client-id", required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--lora-alpha", type=int, required=True)
    p.add_argument("--shard-file", type=Path, required=True, help="JSON list of example ids")
    p.add_argument("--dataset", default="bbc")
    p.add_argument("--rounds", type=int, required=True)
    p.add_argument("--local-steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--attack",
        choices=ATTACKS,
        default="none",
        help="evaluation only (docs/robustness.md): what this client does to its upload",
    )
    return p


# signflip: push −10× the trained adapter (B scaled by −10, so s·B·A is −10×);
# noise: push Gaussian factors 10× the trained ones' scale; labelflip: train on wrong labels.
ATTACKS = ("none", "signflip", "noise", "labelflip")
ATTACK_GAIN = 10.0


def poisoned(state: dict[str, torch.Tensor], attack: str, seed: int) -> dict[str, torch.Tensor]:
    """The upload an attacking client sends instead of its honest ``state``."""
    if attack == "signflip":
        return {n: -ATTACK_GAIN * t if "lora_B" in n else t for n, t in state.items()}
    if attack == "noise":
        g = torch.Generator().manual_seed(seed)
        return {
            n: torch.randn(t.shape, generator=g, dtype=t.dtype) * float(t.std()) * ATTACK_GAIN
            if "lora_B" in n
            else torch.randn(t.shape, generator=g, dtype=t.dtype) * float(t.std())
            for n, t in state.items()
        }
    return state


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    ds = datasets.load(args.dataset)
    shard = np.array(json.loads(args.shard_file.read_text()), dtype=np.int64)
    first = LoraClassifier(args.rank, args.lora_alpha, ds.prompts, args.max_length)
    models = [first] + [copy.deepcopy(first) for _ in args.federation[1:]]
    labels = ds.labels[shard]
    if args.attack == "labelflip":  # every example is given the next class's label
        labels = (labels + 1) % len(ds.classes)
    train = tokenize(first, [ds.texts[i] for i in shard], labels)
    tag = f"[{args.client_id} r={args.rank}{'' if args.attack == 'none' else ' ' + args.attack}]"
    clients = [RafloraClient(args.target, fed, args.client_id) for fed in args.federation]
    try:
        joined = [
            c.join(rank=args.rank, num_examples=len(shard), lora_alpha=args.lora_alpha).round
            for c in clients
        ]
        statuses = [
            c.wait_for_selection(t, timeout=3600) for c, t in zip(clients, joined, strict=True)
        ]
        for _ in range(args.rounds):
            for client, model, status in zip(clients, models, statuses, strict=True):
                if not is_selected(status):
                    print(
                        f"{tag} {client.federation_id} round {status.round}: not selected",
                        file=sys.stderr,
                        flush=True,
                    )
                    continue
                started = time.perf_counter()
                try:
                    loss = train_round(client, model, train, len(shard), args)
                except FailedPreconditionError as exc:  # over-selected, and the round closed
                    print(f"{tag} round {status.round}: too late ({exc.reason})", file=sys.stderr)
                    continue
                print(
                    f"{tag} {client.federation_id} round {status.round}: train loss {loss:.3f} "
                    f"({time.perf_counter() - started:.1f}s)",
                    file=sys.stderr,
                    flush=True,
                )
            statuses = [
                c.wait_for_round(s.round, timeout=3600)
                for c, s in zip(clients, statuses, strict=True)
            ]
        rounds = [s.round for s in statuses]
    finally:
        for c in clients:
            c.close()
    print(f"{tag} done at rounds {rounds}", file=sys.stderr, flush=True)
    return 0


def train_round(
    client: RafloraClient,
    model: LoraClassifier,
    train: Batch,
    num_examples: int,
    args: argparse.Namespace,
) -> float:
    """Pull the global adapter, train locally from it, push the result; the training loss."""
    pulled = client.pull()
    load_pulled_adapter(model.encoder, pulled)
    loss = train_steps(
        model,
        train,
        args.local_steps,
        args.batch_size,
        args.lr,
        seed=args.seed * 100_003 + pulled.round,
    )
    upload = poisoned(adapter_state(model.encoder), args.attack, args.seed * 7 + pulled.round)
    client.push(upload, round=pulled.round, num_examples=num_examples)
    return loss


if __name__ == "__main__":
    raise SystemExit(main())
