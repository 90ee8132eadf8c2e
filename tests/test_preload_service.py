"""Uploads kept in memory for the close (rounds/preload.py), attacked through the real server.

A client that opens a push and never finishes it holds room in the server-wide budget while
its stream lasts; the others keep being served and the round publishes without it.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save

from raflora.client_sdk import AdminClient, RafloraClient
from raflora.server.testing import threaded_server

from .helpers.adapters import factors
from .helpers.federations import every_client_spec
from .helpers.stalled import stalled_push
from .helpers.waiting import wait_until

MODULES = {"q": (32, 24), "v": (24, 32)}


def test_a_never_ending_push_holds_its_room_and_nobody_waits_for_it(tmp_path: Path) -> None:
    payload = save(factors(2, 9, MODULES))
    with threaded_server(tmp_path / "d", preload_memory_mib=1) as srv:
        budget = srv.server.hub.preload_budget
        with AdminClient(srv.target) as admin:
            admin.create_federation(every_client_spec("fed", MODULES, 2, max_rank=4))
        with RafloraClient(srv.target, "fed", "hostile") as hostile:
            hostile.join(2, num_examples=10)
            with stalled_push(srv.target, "fed", "hostile", payload, rank=2):
                assert wait_until(lambda: budget.used == len(payload), timeout=10)
                honest = [RafloraClient(srv.target, "fed", c) for c in ("a", "b")]
                for i, c in enumerate(honest):
                    c.join(2, num_examples=10)
                    c.push(factors(2, i, MODULES), round=0, num_examples=10)
                # the round closed on the honest uploads alone; the hostile push is late now
                assert wait_until(lambda: all(c.pull().round == 1 for c in honest), timeout=20)
                for c in honest:
                    c.close()
            assert wait_until(lambda: budget.used == 0, timeout=10), budget.used
