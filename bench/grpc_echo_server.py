"""A bare grpcio (asyncio) server whose Echo method echoes every message back: the ceiling that
``bench_service.py`` measures the service against. Bytes in, the same bytes out, no protobuf,
no hashing, no disk. ``Up`` (client stream) keeps the messages it receives and ``Down``
(server stream) sends them back: one way at a time, as a push and then a pull move them.
Prints its port on stdout, then serves until killed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from grpc import aio

METHOD = "/bench.Echo/Echo"
OPTIONS = [
    ("grpc.max_receive_message_length", 16 << 20),
    ("grpc.max_send_message_length", 16 << 20),
]


async def echo(requests: AsyncIterator[bytes], context: object) -> AsyncIterator[bytes]:
    async for message in requests:
        yield message


_kept: list[bytes] = []


async def up(requests: AsyncIterator[bytes], context: object) -> bytes:
    _kept.clear()
    async for message in requests:
        _kept.append(message)
    return b""


async def down(request: bytes, context: aio.ServicerContext[bytes, bytes]) -> None:
    for message in _kept:
        await context.write(message)


async def main() -> None:
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo",
        {
            "Echo": grpc.stream_stream_rpc_method_handler(echo),
            "Up": grpc.stream_unary_rpc_method_handler(up),
            "Down": grpc.unary_stream_rpc_method_handler(down),
        },
    )
    server = aio.server(options=OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main())
