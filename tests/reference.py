"""Independent float64 NumPy implementations of docs/design.md §2, written from the formulas.

Nothing here imports the engine: tests compare the engine against these.
Each client is a dict with keys rank, n, s, and per-module (B, A) NumPy arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

Array = NDArray[np.float64]
Client = dict[str, Any]


def weights(clients: Sequence[Client], uniform: bool = False) -> Array:
    raw = np.ones(len(clients)) if uniform else np.array([float(c["n"]) for c in clients])
    return np.asarray(raw / raw.sum(), dtype=np.float64)


def truncate(D: Array, R: int) -> Array:
    U, S, Vt = np.linalg.svd(D, full_matrices=False)
    return np.asarray((U[:, :R] * S[:R]) @ Vt[:R], dtype=np.float64)


def flexlora(clients: Sequence[Client], m: str, R: int, uniform: bool = False) -> Array:
    p = weights(clients, uniform)
    D = sum(p[i] * c["s"] * c[m][0] @ c[m][1] for i, c in enumerate(clients))
    return truncate(np.asarray(D), R)


def raflora(clients: Sequence[Client], m: str, R: int, uniform: bool = False) -> Array:
    """Partition form: ΔW' = Σ_k Σ_{i∈S_k} (p_i / Σ_{S_k} p) s_i B_i[:, P_k] A_i[P_k, :]."""
    return truncate(raflora_sum(clients, m, uniform), R)


def raflora_sum(clients: Sequence[Client], m: str, uniform: bool = False) -> Array:
    """:func:`raflora`'s ΔW' before its truncation to rank R."""
    p = weights(clients, uniform)
    rhos = sorted({c["rank"] for c in clients})
    d_out, d_in = clients[0][m][0].shape[0], clients[0][m][1].shape[1]
    D = np.zeros((d_out, d_in))
    prev = 0
    for rho in rhos:
        holders = [i for i, c in enumerate(clients) if c["rank"] >= rho]
        total = sum(p[i] for i in holders)
        for i in holders:
            B, A = clients[i][m]
            D += (p[i] / total) * clients[i]["s"] * B[:, prev:rho] @ A[prev:rho, :]
        prev = rho
    return D


def _padded(c: Client, m: str, R: int) -> tuple[Array, Array]:
    B, A = c[m]
    Bp = np.zeros((B.shape[0], R))
    Ap = np.zeros((R, A.shape[1]))
    Bp[:, : c["rank"]] = c["s"] * B
    Ap[: c["rank"]] = A
    return Bp, Ap


def hetlora(
    clients: Sequence[Client], m: str, R: int, uniform: bool = False, norm_weighted: bool = False
) -> Array:
    p = weights(clients, uniform)
    if norm_weighted:
        norms = np.array([np.linalg.norm(c["s"] * c[m][0] @ c[m][1]) for c in clients])
        p = p * norms / (p * norms).sum()
    pads = [_padded(c, m, R) for c in clients]
    B = sum(p[i] * pads[i][0] for i in range(len(clients)))
    A = sum(p[i] * pads[i][1] for i in range(len(clients)))
    return np.asarray(B @ A)


def rbla(clients: Sequence[Client], m: str, R: int, previous: tuple[Array, Array]) -> Array:
    """Row/column j averaged over the clients with rank > j; uncovered j keeps ``previous``."""
    p = weights(clients)
    Bg, Ag = previous[0].copy(), previous[1].copy()
    for j in range(R):
        cover = [i for i, c in enumerate(clients) if c["rank"] > j]
        if not cover:
            continue
        total = sum(p[i] for i in cover)
        Bg[:, j] = sum(p[i] / total * clients[i]["s"] * clients[i][m][0][:, j] for i in cover)
        Ag[j] = sum(p[i] / total * clients[i][m][1][j] for i in cover)
    return np.asarray(Bg @ Ag)


def flora(clients: Sequence[Client], m: str) -> Array:
    p = weights(clients)
    return np.asarray(sum(p[i] * c["s"] * c[m][0] @ c[m][1] for i, c in enumerate(clients)))


def energy(sigma: Array, bounds: Sequence[int]) -> tuple[list[float], float]:
    """Partition energies and effective rank, straight from the definitions."""
    e = np.sort(sigma)[::-1] ** 2
    total = e.sum()
    parts, prev = [], 0
    for b in bounds:
        parts.append(float(e[prev:b].sum() / total))
        prev = b
    q = e[e > 0] / total
    return parts, float(np.exp(-(q * np.log(q)).sum()))


def raflora_carry_over(
    clients: Sequence[Client], m: str, R: int, previous: tuple[Array, Array, Array]
) -> Array:
    """Per-index form with carry-over: index j of client i weighs p_i / Σ_{l: r_l ≥ j} p_l; an
    index j > max_i r_i that no participant holds is held by the previous state (U, σ, Vᵀ)
    with weight 1, i.e. contributes σ_j u_j v_jᵀ."""
    p = weights(clients)
    U, S, Vt = previous
    d_out, d_in = U.shape[0], Vt.shape[1]
    D = np.zeros((d_out, d_in))
    r_max = max(c["rank"] for c in clients)
    for j in range(r_max):
        holders = [i for i, c in enumerate(clients) if c["rank"] > j]
        total = sum(p[i] for i in holders)
        for i in holders:
            B, A = clients[i][m]
            D += (p[i] / total) * clients[i]["s"] * np.outer(B[:, j], A[j, :])
    for j in range(r_max, len(S)):
        D += S[j] * np.outer(U[:, j], Vt[j, :])
    return truncate(D, R)


def private_raflora(
    clients: Sequence[Client],
    modules: Sequence[str],
    R: int,
    clip_norm: float,
    denominator: int,
    noise: dict[str, Array],
) -> dict[str, Array]:
    """§2.9 with raFLoRA's partition weights over uniform p: each client's boosted update
    u_i = Σ_k (n / |S_k|) s_i B_i[:, P_k] A_i[P_k, :] (all modules) is clipped to clip_norm,
    the clipped updates are summed over ``denominator``, the noise added, and each module
    truncated to rank R."""
    n = len(clients)
    rhos = sorted({c["rank"] for c in clients})
    boosted = []
    for c in clients:
        u = {}
        for m in modules:
            B, A = c[m]
            D = np.zeros((B.shape[0], A.shape[1]))
            prev = 0
            for rho in rhos:
                if c["rank"] >= rho:
                    holders = sum(1 for o in clients if o["rank"] >= rho)
                    D += (n / holders) * c["s"] * B[:, prev:rho] @ A[prev:rho, :]
                prev = rho
            u[m] = D
        boosted.append(u)
    out = {}
    for m in modules:
        total = np.array(noise[m], dtype=np.float64)
        for u in boosted:
            norm = np.sqrt(sum(float(np.sum(u[k] ** 2)) for k in modules))
            total = total + min(1.0, clip_norm / norm) * u[m] / denominator
        out[m] = truncate(total, R)
    return out
