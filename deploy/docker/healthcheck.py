"""Container health check for docker compose (Kubernetes uses its native probes).

python healthcheck.py http 8080 /readyz    exit 0 when GET answers 2xx
python healthcheck.py grpc 50052           exit 0 when grpc.health.v1 says SERVING
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request

TIMEOUT_SECONDS = 3.0


def check_http(port: int, path: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=TIMEOUT_SECONDS):
            return True
    except (urllib.error.URLError, OSError):
        return False


def check_grpc(port: int) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=TIMEOUT_SECONDS
            )
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "http":
        return 0 if check_http(int(argv[1]), argv[2] if len(argv) > 2 else "/") else 1
    if len(argv) == 2 and argv[0] == "grpc":
        return 0 if check_grpc(int(argv[1])) else 1
    sys.stderr.write(__doc__ or "")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
