"""A bare grpcio (asyncio) server whose one method echoes every message back: the ceiling that
``bench_service.py`` measures the service against. Bytes in, the same bytes out, no protobuf,
no hashing, no disk. Prints its port on stdout, then serves until killed."""

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


async def main() -> None:
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.stream_stream_rpc_method_handler(echo)}
    )
    server = aio.server(options=OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main())
