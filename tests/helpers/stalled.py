"""An attacker's push that sends its header and a few bytes, then nothing, for as long as the
test holds it open (within the server's timeouts)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc

from raflora.client_sdk import pb
from raflora.v1 import aggregation_pb2_grpc as pb_grpc

from .adapters import push_header


@contextmanager
def stalled_push(
    target: str, federation_id: str, client_id: str, payload: bytes, *, rank: int
) -> Iterator[Any]:
    """A raw Push of ``payload`` (announced whole) that stops after 64 bytes; yields its call
    future, cancelled on exit."""
    release = threading.Event()

    def requests() -> Iterator[pb.PushRequest]:
        yield pb.PushRequest(
            header=push_header(federation_id, client_id, payload, rank=rank, num_examples=10)
        )
        yield pb.PushRequest(data=payload[:64])
        release.wait(60)

    channel = grpc.insecure_channel(target)
    stub: Any = pb_grpc.AggregationServiceStub(channel)  # generated without annotations
    call = stub.Push.future(requests(), timeout=120)
    try:
        yield call
    finally:
        call.cancel()
        release.set()
        channel.close()
