"""The gRPC benchmark's client, in its own process (so its 128 asyncio streams do not share the
server's and the engine thread's GIL).

  python -m benchmarks.grpc_load --port P --workload IN.json --out OUT.json
IN.json: a list of {text, max_new_tokens, arrival_s, priority}. One asyncio task per request over
one grpc.aio channel: sleep until its arrival, stream Generate (ignore_eos), record the arrival
time, each token's receive time, completion_tokens, the time the stream finished and the
server's own TTFT and queue time from the final message's stats.
OUT.json: {"wall_s": ..., "records": {index: {arrival, times, priority, done, tokens}}} (times on
this process's monotonic clock; only differences are meaningful). Exits non-zero if any stream
fails.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import grpc
from tqdm import tqdm

from baton.v1 import baton_pb2 as pb
from baton.v1 import baton_pb2_grpc as pb_grpc


async def run(target: str, reqs: list[dict], bar) -> tuple[dict[int, dict], float]:
    records: dict[int, dict] = {}

    async def one(i: int, stub) -> None:
        r = reqs[i]
        await asyncio.sleep(r["arrival_s"])
        rec = records[i] = {"arrival": time.monotonic(), "times": [], "priority": r["priority"]}
        msg = pb.GenerateRequest(prompt=r["text"], priority=r["priority"],
                                 params=pb.GenerationParams(max_new_tokens=r["max_new_tokens"], ignore_eos=True))
        async for resp in stub.Generate(msg):
            if resp.token_ids:
                now = time.monotonic()
                rec["times"].extend([now] * len(resp.token_ids))
                bar.update(len(resp.token_ids))
            if resp.finish_reason:
                rec["done"], rec["tokens"] = time.monotonic(), resp.usage.completion_tokens
                # the server's view: from its submit of the request to the engine's first token
                rec["server_ttft"] = resp.stats.time_to_first_token_seconds
                rec["server_queued"] = resp.stats.queued_seconds

    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        start = time.monotonic()
        await asyncio.gather(*(one(i, stub) for i in range(len(reqs))))
        return records, time.monotonic() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.grpc_load", description="gRPC benchmark client")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--workload", required=True, help="JSON list of {text, max_new_tokens, arrival_s, priority}")
    p.add_argument("--out", required=True, help="where to write {wall_s, records}")
    args = p.parse_args(argv)
    with open(args.workload) as f:
        reqs = json.load(f)
    bar = tqdm(total=sum(r["max_new_tokens"] for r in reqs), desc="grpc", unit="tok", file=sys.stderr, mininterval=2)
    records, wall = asyncio.run(run(f"{args.host}:{args.port}", reqs, bar))
    bar.close()
    unfinished = [i for i in range(len(reqs)) if i not in records or "done" not in records[i]]
    with open(args.out, "w") as f:
        json.dump({"wall_s": wall, "records": records}, f)
    if unfinished:
        print(f"grpc_load: {len(unfinished)} streams did not finish: {unfinished[:10]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
