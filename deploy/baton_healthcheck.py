"""Container health check: exit 0 when the Baton server's gRPC health ("" by default) is SERVING.

    python deploy/baton_healthcheck.py [--target HOST:PORT] [--service NAME] [--timeout SECONDS]

The target defaults to 127.0.0.1:$BATON_PORT (50051). Exit 1 on NOT_SERVING / UNKNOWN, 2 when the
server cannot be reached in time. Used by the Dockerfiles' HEALTHCHECK and by tests/test_deploy.py.
"""
from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(target: str, service: str = "", timeout: float = 3.0) -> str:
    with grpc.insecure_channel(target) as channel:
        resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                         timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default=f"127.0.0.1:{os.environ.get('BATON_PORT', '50051')}")
    p.add_argument("--service", default="")
    p.add_argument("--timeout", type=float, default=3.0)
    args = p.parse_args(argv)
    try:
        status = check(args.target, args.service, args.timeout)
    except grpc.RpcError as exc:
        print(f"{args.target}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 2
    print(f"{args.target}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
