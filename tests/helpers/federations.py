"""Federations for service tests: their specs, and creating them with clients joined."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from typing import Any

from raflora.client_sdk import AdminClient, RafloraClient, pb
from raflora.server.testing import federation_spec

from .adapters import Shapes

#: A FederationSpec from ``{module: (d_out, d_in)}`` (the shipped helper, under its short name).
spec = federation_spec

#: A client of a test federation: (client id, rank, examples, LoRA alpha).
ClientSpec = tuple[str, int, int, float]


def every_client_spec(
    federation_id: str, modules: Shapes, clients: int, **options: Any
) -> pb.FederationSpec:
    """A federation whose rounds close exactly when all ``clients`` have pushed
    (``min_clients = expected_clients = clients``); ``options`` as for :func:`spec`."""
    return spec(federation_id, modules, min_clients=clients, expected_clients=clients, **options)


def join_federations(
    stack: ExitStack,
    target: str,
    strategies: Mapping[str, str],
    modules: Shapes,
    clients: Sequence[ClientSpec],
    **options: Any,
) -> dict[str, list[RafloraClient]]:
    """Create one federation per ``{federation id: strategy}``, each closing its rounds when
    every one of ``clients`` has pushed, and join all ``clients`` to each.

    The SDK clients (one channel each, in ``clients`` order) are closed with ``stack``.
    ``options`` are further :func:`spec` fields (``max_rank``, ``init_seed``, ...).
    """
    admin = stack.enter_context(AdminClient(target))
    joined: dict[str, list[RafloraClient]] = {}
    for fid, strategy in strategies.items():
        admin.create_federation(
            every_client_spec(fid, modules, len(clients), strategy=strategy, **options)
        )
        joined[fid] = []
        for cid, rank, n, alpha in clients:
            client = stack.enter_context(RafloraClient(target, fid, cid))
            client.join(rank=rank, num_examples=n, lora_alpha=alpha)
            joined[fid].append(client)
    return joined
