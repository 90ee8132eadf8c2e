"""Evaluation harness: strategies × seeds × label skew × rank layouts × participation.

Every cell (dataset, skew, layout, seed) runs the real thing: one ``raflora-server``, six
separate client processes speaking gRPC through the SDK (each takes part in one federation per
strategy, in lockstep, with identical data, mini-batches and round-0 init, so strategies are
compared pairwise), and an evaluator (an observer client) that pulls every strategy's global
adapter each round. Under partial participation the server selects the clients of each round
(the same seeded draw in every strategy's federation, so the pairing holds) and only those
train.
Per run it records accuracy and loss per round, E_min, partition energies, effective rank and
‖ΔW‖. Cells are written as they finish, so an interrupted grid resumes where it stopped; a CPU
budget stops scheduling new cells in time. ``--report-only`` rebuilds the summary.

    python eval/eval_grid.py --budget-minutes 55 --out out/eval
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
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
from raflora.demo import data as datasets
from raflora.demo.model import LoraClassifier, evaluate, tokenize
from raflora.demo.orchestrator import (
    delta_norm,
    participation_policy,
    round_policy,
    spawn_trainer,
    wait_for_round,
)
from raflora.server.storage import FileFederationStore
from raflora.server.testing import ServerProcess

# label -> (strategy, options)
VARIANTS: dict[str, tuple[str, dict[str, str]]] = {
    "flexlora": ("flexlora", {}),
    "raflora": ("raflora", {}),
    "ha-gamma0.5": ("raflora_ha", {"gamma": "0.5", "shrinkage": "0"}),
    "ha-shrink2": ("raflora_ha", {"shrinkage": "2"}),  # the project's default strategy
    "ha-cap2": ("raflora_ha", {"max_boost": "2", "shrinkage": "0"}),
    # Partial participation: the spectral strategies with and without carry-over (on by
    # default only for raflora_ha, so "ha-shrink2" above carries over).
    "flexlora-co": ("flexlora", {"carry_over": "true"}),
    "raflora-co": ("raflora", {"carry_over": "true"}),
    "ha-shrink2-noco": ("raflora_ha", {"shrinkage": "2", "carry_over": "false"}),
}
# Further FederationSpec fields of a variant (docs/robustness.md): defences and privacy.
ROBUST = pb.RobustPolicy(clip_quantile=0.8, combine="median_trust")
TRIMMED = pb.RobustPolicy(clip_quantile=0.8, combine="trimmed", trim=2)
VARIANTS.update(
    {
        "ha-robust": ("raflora_ha", {"shrinkage": "2"}),
        "ha-trimmed": ("raflora_ha", {"shrinkage": "2"}),
        "ha-uniform": ("raflora_ha", {"shrinkage": "2"}),  # the private variants' reference
        "ha-dp8": ("raflora_ha", {"shrinkage": "2"}),
        "ha-dp2": ("raflora_ha", {"shrinkage": "2"}),
    }
)
DP_EPSILON = {"ha-dp8": 8.0, "ha-dp2": 2.0}
DP_DELTA = 1e-5
DP_CLIP = 2.0  # above the honest adapters' norms (‖ΔW‖ ≈ 1.2 in docs/evaluation.md)
BASE_RANKS = [2, 2, 4, 4, 16, 16]
LONE_RANKS = [2, 2, 2, 4, 4, 16]


@dataclass(frozen=True)
class Cell:
    dataset: str
    skew: float
    layout: str
    seed: int
    participation: str = "1"  # fraction of clients per round; suffix "s": stratified by rank
    attack: str = "none"  # "<kind>:<k>": clients 0..k-1 attack; "lone-<kind>": the lone rank-R

    @property
    def id(self) -> str:
        skew = "iid" if math.isinf(self.skew) else f"{self.skew:g}"
        part = "" if self.participation == "1" else f"-p{self.participation}"
        attack = "" if self.attack == "none" else f"-x{self.attack.replace(':', '')}"
        return f"{self.dataset}-a{skew}-{self.layout}{part}{attack}-s{self.seed}"

    def attacks(self, ranks: Sequence[int]) -> list[str]:
        """What each client does: "none" or the kind of attack it runs."""
        if self.attack == "none":
            return ["none"] * len(ranks)
        if self.attack.startswith("lone-"):
            kind, top = self.attack.removeprefix("lone-"), max(ranks)
            if sum(r == top for r in ranks) != 1:
                raise ValueError(f"attack {self.attack!r} needs the 'lone' layout")
            return [kind if r == top else "none" for r in ranks]
        kind, count = self.attack.split(":")
        return [kind if k < int(count) else "none" for k in range(len(ranks))]

    @property
    def fraction(self) -> float:
        return float(self.participation.rstrip("s"))

    @property
    def stratified(self) -> bool:
        return self.participation.endswith("s")

    @property
    def setting(self) -> str:
        return self.id.rsplit("-s", 1)[0]


def layout_ranks(layout: str, shard_sizes: Sequence[int], seed: int) -> list[int]:
    """Assign ranks to clients: tied to data size, independent of it, or one lone big rank."""
    rng = np.random.default_rng(seed + 7919)
    if layout == "tied":  # the largest shards train the largest ranks
        order = np.argsort(shard_sizes)
        ranks = [0] * len(shard_sizes)
        for position, client in enumerate(order):
            ranks[int(client)] = sorted(BASE_RANKS)[position]
        return ranks
    if layout == "independent":
        return [int(r) for r in rng.permutation(BASE_RANKS)]
    if layout == "lone":
        return [int(r) for r in rng.permutation(LONE_RANKS)]
    raise ValueError(f"unknown layout {layout!r}")


def run_cell(
    cell: Cell, args: argparse.Namespace, server: ServerProcess, out: Path
) -> dict[str, Any]:
    ds = datasets.load(cell.dataset)
    train_idx, test_idx = datasets.held_out_split(ds.labels, args.test_size, cell.seed)
    shards = [
        train_idx[s]
        for s in datasets.dirichlet_shards(
            ds.labels[train_idx], len(BASE_RANKS), cell.skew, cell.seed
        )
    ]
    ranks = layout_ranks(cell.layout, [len(s) for s in shards], cell.seed)
    R = max(ranks)
    work = out / "work" / cell.id
    work.mkdir(parents=True, exist_ok=True)
    evaluator = LoraClassifier(R, 2 * R, ds.prompts, args.max_length)
    test = tokenize(evaluator, [ds.texts[i] for i in test_idx], ds.labels[test_idx])
    shapes = adapter_shapes(evaluator.encoder)
    admin = AdminClient(server.target)
    feds = {label: f"{cell.id}-{label}".replace(".", "_") for label in args.variants}
    for label, fed in feds.items():
        strategy, options = VARIANTS[label]
        spec = pb.FederationSpec(
            federation_id=fed,
            modules=[pb.ModuleSpec(name=n, d_out=o, d_in=i) for n, (o, i) in shapes.items()],
            strategy=strategy,
            strategy_options=options,
            max_rank=R,
            lora_alpha=2 * R,
            init_seed=cell.seed,
            round_policy=round_policy(len(ranks)),
            participation=participation_policy(cell.fraction, cell.stratified, cell.seed),
        )
        admin.create_federation(with_variant_policies(spec, label, args.rounds))
    attacks = cell.attacks(ranks)
    procs = []
    for k, (rank, shard) in enumerate(zip(ranks, shards, strict=True)):
        shard_file = work / f"client-{k}.json"
        shard_file.write_text(json.dumps(shard.tolist()))
        procs.append(
            spawn_trainer(
                server.target,
                list(feds.values()),
                f"client-{k}",
                rank,
                shard_file,
                work / f"client-{k}.log",
                dataset=cell.dataset,
                rounds=args.rounds,
                local_steps=args.local_steps,
                batch_size=16,
                lr=args.lr,
                max_length=args.max_length,
                seed=1000 * cell.seed + k,
                attack=attacks[k],
            )
        )
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label in feds}
    models = {label: evaluator if i == 0 else _clone(evaluator) for i, label in enumerate(feds)}
    observers = {
        label: RafloraClient(server.target, fed, "evaluator") for label, fed in feds.items()
    }
    try:
        for obs in observers.values():
            obs.join(rank=R, num_examples=0, lora_alpha=2 * R, observer=True)
        for t in range(args.rounds + 1):
            for label, obs in observers.items():
                if t > 0:
                    wait_for_round(obs, t - 1, procs, work, label)
                pulled = obs.pull(round=t)
                load_pulled_adapter(models[label].encoder, pulled)
                accuracy, loss = evaluate(models[label], test)
                runs[label].append(
                    {
                        "round": pulled.round,
                        "accuracy": accuracy,
                        "loss": loss,
                        "e_min": pulled.energy.e_min if pulled.round else None,
                        "effective_rank": pulled.energy.effective_rank,
                        "partition_energy": list(pulled.energy.partition_energy),
                        "delta_norm": delta_norm(models[label]),
                    }
                )
            accs = "  ".join(f"{lab} {runs[lab][-1]['accuracy']:.3f}" for lab in feds)
            print(f"  {cell.id} round {t}: {accs}", file=sys.stderr, flush=True)
        for p in procs:
            if p.wait(300) != 0:
                raise RuntimeError(f"a client failed; see {work}")
        # Who took part in each round, from the server's own published manifests.
        for label, fed in feds.items():
            store = FileFederationStore(server.data_dir / "federations" / fed)
            for record in runs[label][1:]:
                manifest = store.read_manifest(record["round"])
                record["participant_ranks"] = sorted(u.rank for u in manifest.uploads)
    finally:
        for obs in observers.values():
            obs.close()
        for p in procs:
            if p.poll() is None:
                p.kill()
    return {
        "cell": cell.__dict__ | {"id": cell.id, "setting": cell.setting},
        "ranks": ranks,
        "attacks": attacks,
        "shard_sizes": [len(s) for s in shards],
        "runs": runs,
    }


def with_variant_policies(spec: pb.FederationSpec, label: str, rounds: int) -> pb.FederationSpec:
    """The robust and private variants' policies on top of a variant's strategy."""
    if label == "ha-robust":
        spec.robust.CopyFrom(ROBUST)
    elif label == "ha-trimmed":
        spec.robust.CopyFrom(TRIMMED)
    elif label == "ha-uniform":
        spec.weighting = pb.WEIGHTING_UNIFORM
    elif label in DP_EPSILON:
        from raflora.server.engine.accountant import noise_multiplier_for

        spec.weighting = pb.WEIGHTING_UNIFORM
        z = noise_multiplier_for(DP_EPSILON[label], DP_DELTA, rounds)  # everyone, every round
        spec.privacy.CopyFrom(
            pb.PrivacyPolicy(noise_multiplier=z, clip_norm=DP_CLIP, delta=DP_DELTA)
        )
    return spec


def _clone(model: LoraClassifier) -> LoraClassifier:
    import copy

    return copy.deepcopy(model)


# -- summary ---------------------------------------------------------------------------------
def summarize(out: Path, variants: Sequence[str], reference: str = "flexlora") -> dict[str, Any]:
    cells = [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))]
    by_setting: dict[str, list[dict[str, Any]]] = {}
    for c in cells:
        by_setting.setdefault(c["cell"]["setting"], []).append(c)
    summary: dict[str, Any] = {}
    for setting, group in sorted(by_setting.items()):
        rows: dict[str, Any] = {}
        for label in variants:
            if not all(label in c["runs"] for c in group):
                continue
            final = np.array([c["runs"][label][-1]["accuracy"] for c in group])
            mean_over_rounds = np.array(
                [np.mean([r["accuracy"] for r in c["runs"][label][1:]]) for c in group]
            )
            e_min = np.array([c["runs"][label][-1]["e_min"] for c in group], dtype=float)
            loss = np.array([c["runs"][label][-1]["loss"] for c in group])
            norm = np.array([c["runs"][label][-1]["delta_norm"] for c in group])
            # Paired with the reference (FlexLoRA unless told) on the same seed, every round > 0.
            diffs = (
                np.array(
                    [
                        np.mean(
                            [
                                a["accuracy"] - b["accuracy"]
                                for a, b in zip(
                                    c["runs"][label][1:], c["runs"][reference][1:], strict=True
                                )
                            ]
                        )
                        for c in group
                    ]
                )
                if reference in group[0]["runs"]
                else np.zeros(len(group))
            )
            # Rounds whose participants all had ranks below the federation's R: where carry-over
            # can act at all (it is a no-op when a rank-R client takes part).
            short_rounds = np.array(
                [
                    sum(
                        max(r.get("participant_ranks") or [max(c["ranks"])]) < max(c["ranks"])
                        for r in c["runs"][label][1:]
                    )
                    for c in group
                ],
                dtype=float,
            )
            rows[label] = {
                "seeds": len(group),
                "rounds_without_rank_R": _ms(short_rounds),
                "final_accuracy": _ms(final),
                "mean_accuracy_over_rounds": _ms(mean_over_rounds),
                "final_loss": _ms(loss),
                "final_e_min": _ms(e_min),
                "final_delta_norm": _ms(norm),
                "paired_diff_vs_reference": _ms(diffs, sem=True),
            }
        summary[setting] = rows
    return summary


def _ms(values: np.ndarray, sem: bool = False) -> dict[str, float]:
    n = len(values)
    sd = float(np.std(values, ddof=1)) if n > 1 else 0.0
    out = {"mean": float(np.mean(values)), "sd": sd}
    if sem:
        out["sem"] = sd / math.sqrt(n) if n > 1 else float("nan")
    return out


def verdicts(
    summary: dict[str, Any], variants: Sequence[str], reference: str = "flexlora"
) -> dict[str, dict[str, Any]]:
    """Per variant: settings where it is worse than the reference beyond noise (mean < -2·sem,
    or below -0.01 with a single seed), and its mean E_min relative to the reference's."""
    out: dict[str, dict[str, Any]] = {}
    for label in variants:
        if label == reference:
            continue
        worse, e_ratio = [], []
        for setting, rows in summary.items():
            if label not in rows or reference not in rows:
                continue
            d = rows[label]["paired_diff_vs_reference"]
            noise = 2 * d["sem"] if d["sem"] == d["sem"] else 0.01
            if d["mean"] < -max(noise, 1e-9):
                worse.append(setting)
            e_ratio.append(
                rows[label]["final_e_min"]["mean"] / rows[reference]["final_e_min"]["mean"]
            )
        out[label] = {
            "worse_than_reference_in": worse,
            "mean_e_min_ratio_to_reference": float(np.mean(e_ratio)) if e_ratio else None,
        }
    return out


def write_report(
    out: Path, variants: Sequence[str], meta: dict[str, Any], reference: str = "flexlora"
) -> str:
    summary = summarize(out, variants, reference)
    verdict = verdicts(summary, variants, reference)
    (out / "summary.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "verdicts": verdict}, indent=2)
    )
    lines = [
        "| setting | strategy | seeds | final acc | acc over rounds "
        f"| Δacc vs {reference} (paired) | final loss | E_min | ‖ΔW‖ | rounds w/o rank R |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for setting, rows in summary.items():
        for label, r in rows.items():
            d = r["paired_diff_vs_reference"]
            diff = f"{d['mean']:+.3f} ± {d.get('sem', 0):.3f}"
            lines.append(
                f"| {setting} | {label} | {r['seeds']} | {_fmt(r['final_accuracy'])} | "
                f"{_fmt(r['mean_accuracy_over_rounds'])} | {diff} | {_fmt(r['final_loss'])} | "
                f"{_fmt(r['final_e_min'])} | {_fmt(r['final_delta_norm'], 2)} | "
                f"{r['rounds_without_rank_R']['mean']:.1f} |"
            )
    lines.append("")
    for label, v in verdict.items():
        worse = v["worse_than_reference_in"]
        lines.append(
            f"- **{label}**: worse than {reference} beyond noise in {len(worse)} "
            f"setting(s) {worse}; mean E_min = "
            f"{v['mean_e_min_ratio_to_reference'] or float('nan'):.2f}× {reference}'s"
        )
    text = "\n".join(lines)
    (out / "summary.md").write_text(text + "\n")
    _plot(out, summary, variants, reference)
    return text


def _fmt(ms: dict[str, float], digits: int = 3) -> str:
    return f"{ms['mean']:.{digits}f} ± {ms['sd']:.{digits}f}"


def _plot(
    out: Path, summary: dict[str, Any], variants: Sequence[str], reference: str = "flexlora"
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(summary)
    if not settings:
        return
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.45 * len(settings) + 2))
    y = np.arange(len(settings))
    height = 0.8 / max(len(variants) - 1, 1)
    for k, label in enumerate(v for v in variants if v != reference):
        d = [
            summary[s].get(label, {}).get("paired_diff_vs_reference", {"mean": np.nan, "sem": 0})
            for s in settings
        ]
        axes[0].barh(
            y + k * height,
            [x["mean"] for x in d],
            height,
            xerr=[2 * (x.get("sem") or 0) for x in d],
            label=label,
        )
        e = [
            summary[s].get(label, {}).get("final_e_min", {"mean": np.nan})["mean"] for s in settings
        ]
        axes[1].barh(y + k * height, e, height, label=label)
    ef = [
        summary[s].get(reference, {}).get("final_e_min", {"mean": np.nan})["mean"] for s in settings
    ]
    axes[1].scatter(ef, y + 0.4, marker="|", s=200, color="black", label=reference)
    for ax, title in zip(
        axes, (f"accuracy − {reference} (paired over rounds, ±2 sem)", "final E_min"), strict=True
    ):
        ax.set_yticks(y + 0.4, settings)
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="x")
    axes[0].axvline(0, color="black", lw=0.8)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "summary.png", dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--datasets", default="bbc")
    p.add_argument("--skews", default="0.1,0.5,1,inf", help="Dirichlet alphas; inf = IID")
    p.add_argument("--layouts", default="tied,independent,lone")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument(
        "--participations",
        default="1",
        help="fractions of clients selected per round; suffix s = stratified by rank (0.5s)",
    )
    p.add_argument(
        "--attacks",
        default="none",
        help="'none', '<kind>:<k>' (clients 0..k-1 attack) or 'lone-<kind>' (the lone rank-R "
        "client of the 'lone' layout); kinds: signflip, noise, labelflip",
    )
    p.add_argument(
        "--variants",
        default="flexlora,raflora,ha-gamma0.5,ha-shrink2,ha-cap2,flexlora-co,raflora-co,ha-shrink2-noco",
        help=f"known: {', '.join(VARIANTS)}",
    )
    p.add_argument("--reference", default="flexlora", help="the variant paired differences use")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--local-steps", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--test-size", type=int, default=200)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument(
        "--budget-minutes",
        type=float,
        default=float("inf"),
        help="stop starting new cells when this much wall time would be exceeded",
    )
    p.add_argument("--out", type=Path, default=Path("out/eval"))
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")
    if args.reference not in args.variants:
        p.error(f"--reference {args.reference!r} is not among --variants")
    (args.out / "cells").mkdir(parents=True, exist_ok=True)
    meta = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    if not args.report_only:
        torch.set_num_threads(1)
        cells = [
            Cell(d, float(a), layout, int(s), part, attack)
            for s, d, a, layout, part, attack in itertools.product(
                args.seeds.split(","),
                args.datasets.split(","),
                args.skews.split(","),
                args.layouts.split(","),
                args.participations.split(","),
                args.attacks.split(","),
            )
        ]
        todo = [c for c in cells if not (args.out / "cells" / f"{c.id}.json").exists()]
        print(f"{len(cells)} cells, {len(cells) - len(todo)} already done", file=sys.stderr)
        started = time.monotonic()
        durations: list[float] = []
        server = ServerProcess(
            args.out / "server-data", args.out / "server.log", host=None, device=None
        )
        try:
            server.start()
            for n, cell in enumerate(todo, 1):
                elapsed = (time.monotonic() - started) / 60
                expected = float(np.mean(durations)) if durations else 0.0
                if elapsed + expected > args.budget_minutes:
                    print(
                        f"budget of {args.budget_minutes} min reached: {len(todo) - n + 1} cells "
                        "left for a later run (rerun the same command to resume)",
                        file=sys.stderr,
                    )
                    break
                t0 = time.monotonic()
                print(f"[{n}/{len(todo)}] {cell.id}", file=sys.stderr, flush=True)
                result = run_cell(cell, args, server, args.out)
                durations.append((time.monotonic() - t0) / 60)
                result["minutes"] = durations[-1]
                tmp = args.out / "cells" / f".{cell.id}.tmp"
                tmp.write_text(json.dumps(result, indent=1))
                tmp.replace(args.out / "cells" / f"{cell.id}.json")
        finally:
            server.stop()
    print(write_report(args.out, args.variants, meta, args.reference))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
