"""Fold a round's uploads into running orthonormal bases as they arrive (docs/design.md §2.10).

Every spectral strategy's ``ΔW'`` is a weighted sum of the uploads' column products plus the
carried part of the previous state, so it lies in ``span(B_i, U) ⊗ span(A_iᵀ, V)``. Keeping
orthonormal bases ``Q_B``, ``Q_A`` of those two spans, grown by block Gram–Schmidt each time an
upload is acknowledged, the strategy can aggregate the *compressed* factors ``Q_Bᵀ B_i`` and
``A_i Q_A`` (k_B × r_i and r_i × k_A, k ≤ min(d, N)) and its SVD is lifted back:
``U = Q_B U'``, ``V = Q_A V'``. An orthonormal change of basis keeps every norm, weight and
singular value, so the strategy's arithmetic is the same; what the round's close pays for is
only the compressed problem. The work of the bases is spread over the round.

Pure functions and value objects on torch tensors; no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch
from torch import Tensor

from .errors import ShapeMismatchError
from .lowrank import canonical_signs
from .strategies import Strategy, make_strategy
from .strategies.spectral import SpectralStrategy
from .types import (
    AdapterSchema,
    ClientUpdate,
    FactorPair,
    GlobalState,
    LowRank,
    ModuleShape,
)

# A residual direction is new only above this many ulps of the block it came from: a block
# already in the span leaves ~0.5 ulp after two Gram–Schmidt passes (measured at d = 1024,
# k = 60 … 1000, fp32), so the bases do not fill up with rounding noise.
NEW_DIRECTION_ULPS = 16.0


class SpanBasis:
    """An orthonormal basis of the span of every block absorbed so far (one side of a module)."""

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.dim = dim
        self._buffer = torch.empty(dim, min(dim, 64), dtype=dtype, device=device)
        self.size = 0

    @property
    def Q(self) -> Tensor:
        return self._buffer[:, : self.size]

    def held_bytes(self) -> int:
        return self._buffer.numel() * self._buffer.element_size()

    def absorb(self, X: Tensor) -> Tensor:
        """Grow the basis to cover ``X`` (dim × r); return ``C`` with ``X ≈ Q C`` (size × r).

        Each column ``x_j`` is left with at most ``NEW_DIRECTION_ULPS·√r`` ulps of ‖x_j‖: the
        residual judged rounding. The floor is per column, so one huge column (an upload
        with B·c, A/c: the same product) cannot push another upload's directions under it.
        """
        if X.shape[0] != self.dim:
            raise ShapeMismatchError("factors", f"expected {self.dim} rows, got {X.shape[0]}")
        Q = self.Q
        C = Q.T @ X
        R = X - Q @ C
        C2 = Q.T @ R  # a second pass: classical Gram–Schmidt loses orthogonality once
        R = R - Q @ C2
        C = C + C2
        if self.size == self.dim or R.shape[1] == 0:
            return C
        floor = NEW_DIRECTION_ULPS * torch.finfo(X.dtype).eps
        norms = torch.linalg.vector_norm(X, dim=0)
        relative = R * torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms))
        if float(torch.linalg.vector_norm(relative, dim=0).max()) <= floor:
            return C  # every column is within its floor already: nothing new to add
        Ur, Sr, _ = torch.linalg.svd(relative, full_matrices=False)
        new = Ur[:, Sr > floor][:, : self.dim - self.size]
        if not new.shape[1]:
            return C
        # Directions barely above the floor carry ~eps·‖X‖/σ of Q: orthogonalise again.
        new = new - Q @ (Q.T @ new)
        new, _ = torch.linalg.qr(new)
        self._append(new)
        return torch.cat([C, new.T @ X])

    def _append(self, new: Tensor) -> None:
        needed = self.size + int(new.shape[1])
        if needed > self._buffer.shape[1]:
            grown = torch.empty(
                self.dim,
                min(self.dim, max(needed, 2 * self._buffer.shape[1])),
                dtype=self._buffer.dtype,
                device=self._buffer.device,
            )
            grown[:, : self.size] = self.Q
            self._buffer = grown
        self._buffer[:, self.size : needed] = new
        self.size = needed

    def ensure_nonempty(self) -> None:
        """A basis of a span that is {0} still needs one vector for the compressed shape."""
        if self.size == 0:
            e = torch.zeros(self.dim, 1, dtype=self._buffer.dtype, device=self._buffer.device)
            e[0, 0] = 1.0
            self._append(e)


class RoundBases:
    """The running bases of one round, per module, seeded with the previous global state.

    Seeding with the previous state's U and V keeps the carried components (design §2.7) in
    the span; :meth:`compress_state` then represents that state exactly.
    """

    def __init__(
        self, schema: AdapterSchema, state: GlobalState, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.schema = schema
        self.dtype = dtype
        self.device = device
        self.out: dict[str, SpanBasis] = {}
        self.inp: dict[str, SpanBasis] = {}
        for name, shape in schema.modules.items():
            self.out[name] = SpanBasis(shape.d_out, dtype, device)
            self.inp[name] = SpanBasis(shape.d_in, dtype, device)
            module = state.modules.get(name)
            if isinstance(module, LowRank) and module.rank:
                self.out[name].absorb(module.U.to(dtype=dtype, device=device))
                self.inp[name].absorb(module.V.to(dtype=dtype, device=device))

    def fold(self, update: ClientUpdate) -> ClientUpdate:
        """Absorb one validated upload; return it in the bases as they now are."""
        return self.fold_many([update])[0]

    def fold_many(self, updates: Sequence[ClientUpdate]) -> list[ClientUpdate]:
        """Absorb validated uploads as one block per module (fewer, larger products).

        Each upload's factors become ``B' = Q_Bᵀ B`` (k_B × r) and ``A' = A Q_A`` (r × k_A);
        the close pads them with zeros to the final widths (later directions are orthogonal
        to them).
        """
        ranks = [u.rank for u in updates]
        factors: list[dict[str, FactorPair]] = [{} for _ in updates]
        for name in self.schema:
            B = torch.cat([u.factors[name].B for u in updates], dim=1)
            A = torch.cat([u.factors[name].A for u in updates], dim=0)
            B = B.to(dtype=self.dtype, device=self.device)
            A = A.to(dtype=self.dtype, device=self.device)
            CB = torch.split(self.out[name].absorb(B), ranks, dim=1)
            CA = torch.split(self.inp[name].absorb(A.T), ranks, dim=1)
            for i, (cb, ca) in enumerate(zip(CB, CA, strict=True)):
                factors[i][name] = FactorPair(B=cb.contiguous(), A=ca.T.contiguous())
        return [
            ClientUpdate(u.client_id, u.rank, u.num_examples, u.scale, f)
            for u, f in zip(updates, factors, strict=True)
        ]

    def compressed_schema(self) -> AdapterSchema:
        for name in self.schema:
            self.out[name].ensure_nonempty()
            self.inp[name].ensure_nonempty()
        return AdapterSchema(
            {name: ModuleShape(self.out[name].size, self.inp[name].size) for name in self.schema}
        )

    def compress_updates(self, folded: Sequence[ClientUpdate]) -> list[ClientUpdate]:
        """Every folded upload zero-padded to the final widths."""
        out = []
        for u in folded:
            factors = {}
            for name, f in u.factors.items():
                k_b, k_a = self.out[name].size, self.inp[name].size
                B = f.B.new_zeros(k_b, f.B.shape[1])
                B[: f.B.shape[0]] = f.B
                A = f.A.new_zeros(f.A.shape[0], k_a)
                A[:, : f.A.shape[1]] = f.A
                factors[name] = FactorPair(B=B, A=A)
            out.append(ClientUpdate(u.client_id, u.rank, u.num_examples, u.scale, factors))
        return out

    def compress_state(self, state: GlobalState) -> GlobalState:
        modules: dict[str, LowRank] = {}
        for name in self.schema:
            m = state.modules[name]
            assert isinstance(m, LowRank)
            U = m.U.to(dtype=self.dtype, device=self.device)
            V = m.V.to(dtype=self.dtype, device=self.device)
            modules[name] = LowRank(
                self.out[name].Q.T @ U,
                m.S.to(dtype=self.dtype, device=self.device),
                self.inp[name].Q.T @ V,
            )
        return replace(state, modules=modules)

    def lift(self, compressed: GlobalState) -> GlobalState:
        """The compressed aggregate in the full space: U = Q_B U', V = Q_A V'."""
        modules: dict[str, LowRank] = {}
        for name in self.schema:
            m = compressed.modules[name]
            assert isinstance(m, LowRank)
            modules[name] = canonical_signs(
                LowRank(self.out[name].Q @ m.U, m.S, self.inp[name].Q @ m.V)
            )
        return replace(compressed, modules=modules)

    def widths(self) -> Mapping[str, tuple[int, int]]:
        return {name: (self.out[name].size, self.inp[name].size) for name in self.schema}


def can_fold(strategy: Strategy) -> bool:
    """Spectral strategies only, and only where no step looks at the uploads as a whole.

    Privacy adds noise in the full space and the robust defences weigh clients by each
    other's updates; both keep the one-shot path.
    """
    config = strategy.config
    return (
        isinstance(strategy, SpectralStrategy)
        and not config.privacy.active
        and not config.robust.active
    )


class CompressedAggregation:
    """The strategy of the round, run on the compressed problem and lifted back."""

    def __init__(self, strategy: Strategy, bases: RoundBases, state: GlobalState) -> None:
        if not can_fold(strategy):
            raise ValueError(f"strategy {strategy.name!r} cannot aggregate folded uploads")
        self.bases = bases
        schema = bases.compressed_schema()
        self.strategy = make_strategy(strategy.name, replace(strategy.config, schema=schema))
        self.state = bases.compress_state(state)

    def aggregate(self, folded: Sequence[ClientUpdate]) -> GlobalState:
        updates = self.bases.compress_updates(folded)
        return self.bases.lift(self.strategy.aggregate(self.state, updates))
