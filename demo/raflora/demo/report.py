"""The demo's outputs: a console table, a JSON report and a PNG plot."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RoundResult:
    round: int
    accuracy: float
    loss: float
    e_min: float
    effective_rank: float
    partition_energy: list[float]
    delta_norm: float
    seconds: float


def table(results: Mapping[str, Sequence[RoundResult]]) -> str:
    lines = [
        f"{'strategy':<10} {'round':>5} {'accuracy':>9} {'loss':>7} {'E_min':>7} "
        f"{'eff.rank':>8} {'|dW|':>7}"
    ]
    for strategy, rows in results.items():
        for r in rows:
            lines.append(
                f"{strategy:<10} {r.round:>5} {r.accuracy:>9.3f} {r.loss:>7.3f} "
                f"{r.e_min:>7.3f} {r.effective_rank:>8.2f} {r.delta_norm:>7.3f}"
            )
    return "\n".join(lines)


def write_json(
    path: Path, config: Mapping[str, Any], results: Mapping[str, Sequence[RoundResult]]
) -> None:
    body = {
        "config": dict(config),
        "results": {s: [_strict(asdict(r)) for r in rows] for s, rows in results.items()},
    }
    path.write_text(json.dumps(body, indent=2, allow_nan=False))


def _strict(row: dict[str, Any]) -> dict[str, Any]:
    """Strict JSON: an undefined value (E_min of round 0) is null, never a bare NaN."""
    return {k: None if isinstance(v, float) and v != v else v for k, v in row.items()}


def plot(path: Path, results: Mapping[str, Sequence[RoundResult]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("accuracy", "held-out accuracy"),
        ("loss", "held-out loss"),
        ("e_min", "E_min (energy in top rho_1 directions)"),
        ("effective_rank", "effective rank of the global update"),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for ax, (key, label) in zip(axes.flat, panels, strict=True):
        for strategy, rows in results.items():
            points = [
                (r.round, getattr(r, key)) for r in rows if getattr(r, key) == getattr(r, key)
            ]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", label=strategy)
        ax.set_xlabel("round")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
