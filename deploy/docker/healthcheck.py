"""Container health check for the image's HEALTHCHECK (docker, podman); exit 0 when healthy.

Plaintext gRPC (the default): a grpc.health.v1 Check on the server's own port must answer
SERVING. With TLS on (RAFLORA_TLS_CERT_FILE set) the check can neither verify the server's
certificate name on 127.0.0.1 nor present a client certificate, so it only checks that the port
accepts connections. Kubernetes ignores HEALTHCHECK and uses its own probes (deploy/kubernetes).

Environment: RAFLORA_PORT (default 50051), RAFLORA_HEALTHCHECK_TARGET (host:port, overrides
it), RAFLORA_HEALTHCHECK_SERVICE (default "": the whole server), RAFLORA_HEALTHCHECK_TIMEOUT.
"""

from __future__ import annotations

import os
import socket
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check_grpc(target: str, service: str = "", timeout: float = 3.0) -> int:
    try:
        with grpc.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.RpcError as exc:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        print(f"unhealthy: {target}: {code.name if code else exc}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"unhealthy: {target}: {status}", file=sys.stderr)
        return 1
    print(f"healthy: {target}: {status}")
    return 0


def check_tcp(target: str, timeout: float = 3.0) -> int:
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        print(f"unhealthy: {target}: {exc}", file=sys.stderr)
        return 1
    print(f"healthy: {target}: accepts connections (TLS on: no gRPC check)")
    return 0


def main() -> int:
    port = os.environ.get("RAFLORA_PORT", "50051")
    target = os.environ.get("RAFLORA_HEALTHCHECK_TARGET", f"127.0.0.1:{port}")
    timeout = float(os.environ.get("RAFLORA_HEALTHCHECK_TIMEOUT", "3"))
    if os.environ.get("RAFLORA_TLS_CERT_FILE"):
        return check_tcp(target, timeout)
    return check_grpc(target, os.environ.get("RAFLORA_HEALTHCHECK_SERVICE", ""), timeout)


if __name__ == "__main__":
    raise SystemExit(main())
