"""Helpers shared by the test files, one copy each.

* :mod:`.adapters`: deterministic LoRA uploads (``factors``), raw push headers, and the
  engine's view of an upload (to compute what the server should publish).
* :mod:`.federations`: ``spec`` (a FederationSpec from module shapes) and creating federations
  with their clients joined.
* :mod:`.metrics`: Prometheus text parsed into samples, and looking one up.
* :mod:`.rpc`: the gRPC status a call ends with, from the SDK or a raw stub.
* :mod:`.waiting`: polling until a condition holds.

The server itself is run with the shipped :mod:`raflora.server.testing`.
"""

from __future__ import annotations

from pathlib import Path

#: The repository root (tests/ is directly below it).
ROOT = Path(__file__).resolve().parents[2]
