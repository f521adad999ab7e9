"""The `baton` command: `serve` runs the server; `generate`, `chat`, `info`, `tokenize` and `preempt`
are clients (baton_client/cli.py).

Every `serve` flag also reads BATON_<FLAG> from the environment (flag wins).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys


def _env(flag: str, default):
    """Default for --flag: BATON_FLAG from the environment, converted like the default."""
    raw = os.environ.get("BATON_" + flag.upper().replace("-", "_"))
    if raw is None:
        return default
    if isinstance(default, bool):
        return raw.lower() in ("1", "true", "yes", "on")
    return raw


SERVE_FLAGS = [
    # flag, type, default, help
    ("host", str, "127.0.0.1", "address to bind"),
    ("port", int, 50051, "gRPC port (0 = any free port)"),
    ("model", str, None, "local Hugging Face model folder (default: built-in SmolLM2-135M-Instruct)"),
    ("device", str, "auto", "auto | cpu | cuda"),
    ("dtype", str, "auto", "auto | float32 | bfloat16 | float16 (auto: bf16 on cuda, fp32 on cpu)"),
    ("max-batch-size", int, 16, "rows in the decode batch"),
    ("max-seq-len", int, None, "prompt + completion tokens per request (default: min(model context, 4096))"),
    ("metrics-port", int, None, "serve Prometheus metrics at http://HOST:PORT/metrics (off when unset)"),
    ("metrics-host", str, None, "address /metrics binds, e.g. a private interface (default: --host)"),
    ("default-max-new-tokens", int, 256, "max_new_tokens when a request sends 0"),
    ("max-new-tokens-limit", int, 4096, "largest max_new_tokens accepted"),
    ("max-queue", int, 1024, "requests waiting beyond the batch before RESOURCE_EXHAUSTED"),
    ("decode", str, "auto", "decode step: fused (Llama/Mistral/Qwen2: fused q/k/v, gate/up and compiled "
                            "element-wise kernels) | hf (the model's own forward) | auto (fused on CUDA where supported)"),
    ("kv-layout", str, "auto", "slab (the paper's padded K/V slab) | paged (pages of --kv-page-size tokens: "
                               "a row holds K/V only for the tokens it has) | auto (paged on CUDA, slab on CPU)"),
    ("kv-page-size", int, 128, "tokens per K/V page with --kv-layout paged"),
    ("tensor-parallel", int, 1, "ranks the model is sharded over (Llama/Mistral/Qwen2), one engine worker process "
                                "each: GPUs 0..N-1 over NCCL on cuda, gloo on cpu"),
    ("tp-allreduce", str, "auto", "auto | nccl | one-shot | fused: how the ranks sum their partial outputs (one-shot: a "
                                  "decode step's by symmetric memory's one-shot all-reduce over NVLink, the rest by NCCL; "
                                  "fused: a decode step's sum, residual add and RMSNorm as one kernel over NVLink; "
                                  "auto: fused on CUDA in bf16, else nccl)"),
    ("max-prefill-tokens", int, 8192, "prompt tokens one prefill forward computes (padded to the longest, unless packed)"),
    ("prefill-chunk-tokens", int, 0, "prompt tokens prefilled per step, interleaved with decode steps, so no "
                                     "stream waits longer than one chunk between two tokens (0 = whole prompts; 768 measured "
                                     "for chat traffic on an H200, README)"),
    ("prefix-cache", str, "off", "off | device | device+host: keep prompts' and finished requests' K/V by "
                                 "token prefix (blocks of --kv-page-size tokens); a request starting with a "
                                 "cached prefix prefills only the rest"),
    ("prefix-cache-device-bytes", int, 1 << 30, "the prefix cache's device tier"),
    ("prefix-cache-host-bytes", int, 4 << 30, "the prefix cache's host tier (device+host)"),
    ("kv-budget-bytes", int, None, "K/V bytes the running batch may hold (default: the whole slab)"),
    ("host-kv-budget-bytes", int, 8 << 30, "K/V bytes that may be parked in host memory"),
    ("pinned-arena-bytes", int, 4 << 30, "of those, page-locked once at start on CUDA (fast offload)"),
    ("aging-seconds", float, 30.0, "a waiting request gains one priority level per this many seconds (0 = off)"),
    ("grace-seconds", float, 10.0, "on SIGTERM, how long in-flight streams may finish"),
    ("engine-max-restarts", int, 5, "engine deaths or failed restarts tolerated within the window; one more "
                                    "and the server exits 3 (0 = exit when the engine dies)"),
    ("engine-restart-window-seconds", float, 600.0, "the window over which engine failures are counted"),
    ("engine-restart-backoff-seconds", float, 1.0, "delay before restarting a dead engine; doubles with each "
                                                   "failure in the window, up to 30 s (or this, if larger)"),
    ("max-message-bytes", int, 4 << 20, "largest request or response message; larger: RESOURCE_EXHAUSTED"),
    ("max-concurrent-streams", int, 0, "concurrent RPCs per client connection (0 = gRPC default, unlimited)"),
    ("tls-cert", str, None, "PEM certificate chain: serve TLS only (needs --tls-key)"),
    ("tls-key", str, None, "PEM private key of --tls-cert"),
    ("tls-client-ca", str, None, "PEM CA bundle: require client certificates signed by it (mutual TLS)"),
    ("auth-tokens-file", str, None, "lines `token caller_name [admin]`: every RPC but Health needs "
                                    "`authorization: Bearer <token>`"),
    ("log-level", str, "info", "debug | info | warning | error"),
]


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="run the gRPC server",
                       description="Run the Baton gRPC server. Each flag also reads BATON_<FLAG>.")
    for flag, typ, default, help_text in SERVE_FLAGS:
        env = "BATON_" + flag.upper().replace("-", "_")
        p.add_argument(f"--{flag}", type=typ, default=_env(flag, default), help=f"{help_text} [env {env}]")
    p.add_argument("--log-prompts", action="store_true", default=_env("log-prompts", False),
                   help="log prompt text (debugging only) [env BATON_LOG_PROMPTS]")
    p.add_argument("--no-warmup", action="store_true", default=_env("no-warmup", False),
                   help="skip the warm-up generation [env BATON_NO_WARMUP]")
    p.add_argument("--engine-in-thread", action="store_true", default=_env("engine-in-thread", False),
                   help="run the engine loop as a thread of the server process, not in its own process "
                        "(debugging; it then shares the GIL with gRPC) [env BATON_ENGINE_IN_THREAD]")


def serve(args: argparse.Namespace) -> int:
    from engine.config import EngineConfig
    from service import logs
    from service.server import ServerConfig, serve as run_server

    logs.configure(args.log_level)
    try:
        if args.decode not in ("auto", "fused", "hf"):
            raise ValueError(f"--decode must be auto, fused or hf, got {args.decode!r}")
        engine_config = EngineConfig(
            model=args.model, device=args.device, dtype=args.dtype, max_batch_size=args.max_batch_size,
            max_seq_len=args.max_seq_len, default_max_new_tokens=args.default_max_new_tokens,
            max_new_tokens_limit=args.max_new_tokens_limit, max_queue=args.max_queue,
            max_prefill_tokens=args.max_prefill_tokens, kv_budget_bytes=args.kv_budget_bytes,
            kv_layout=args.kv_layout, kv_page_size=args.kv_page_size, prefill_chunk_tokens=args.prefill_chunk_tokens,
            prefix_cache=args.prefix_cache, prefix_cache_device_bytes=args.prefix_cache_device_bytes,
            prefix_cache_host_bytes=args.prefix_cache_host_bytes,
            host_kv_budget_bytes=args.host_kv_budget_bytes, pinned_arena_bytes=args.pinned_arena_bytes,
            aging_seconds=args.aging_seconds, tensor_parallel=args.tensor_parallel, tp_allreduce=args.tp_allreduce,
            fused_decode={"auto": None, "fused": True, "hf": False}[args.decode],
            warmup=not args.no_warmup)
        server_config = ServerConfig(
            host=args.host, port=args.port, metrics_port=args.metrics_port, metrics_host=args.metrics_host,
            grace_seconds=args.grace_seconds,
            log_prompts=args.log_prompts, max_message_bytes=args.max_message_bytes,
            max_concurrent_streams=args.max_concurrent_streams, tls_cert=args.tls_cert, tls_key=args.tls_key,
            tls_client_ca=args.tls_client_ca, auth_tokens_file=args.auth_tokens_file,
            engine_in_thread=args.engine_in_thread, log_level=args.log_level,
            engine_max_restarts=args.engine_max_restarts,
            engine_restart_window_seconds=args.engine_restart_window_seconds,
            engine_restart_backoff_seconds=args.engine_restart_backoff_seconds)
        for path in (args.tls_cert, args.tls_key, args.tls_client_ca, args.auth_tokens_file):
            if path and not os.path.isfile(path):
                raise ValueError(f"no such file: {path}")
        if args.auth_tokens_file:
            from service.auth import TokenTable
            TokenTable.load(args.auth_tokens_file)   # a malformed file stops here, before the model loads
        from service import tracing
        tracing.exporter_names()   # a bad OTEL_TRACES_EXPORTER / protocol stops here too
    except ValueError as exc:
        print(f"baton serve: error: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(run_server(server_config, engine_config))


def build_parser() -> argparse.ArgumentParser:
    from baton_client.cli import add_client_args, add_command_parsers, add_generate_args

    parser = argparse.ArgumentParser(prog="baton", description="Baton LLM text-generation service")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    g = sub.add_parser("generate", help="stream a completion from a running server")
    g.add_argument("prompt")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--chat", action="store_true",
                      help="send the prompt as a user chat message (the default when the model has a chat template)")
    mode.add_argument("--raw", action="store_true", help="send the prompt as raw text, no chat template")
    add_client_args(g)
    add_generate_args(g)
    b = sub.add_parser("bench", help="benchmark the engine, the gRPC path and Hugging Face peers "
                       "(all arguments go to benchmarks/bench.py; try `baton bench --help`)", add_help=False)
    b.add_argument("bench_args", nargs=argparse.REMAINDER)
    c = sub.add_parser("chat", help="interactive chat with a running server")
    c.add_argument("--system", default="", help="system message")
    add_client_args(c)
    add_command_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # everything after `bench` belongs to the benchmark's own parser
        from benchmarks import bench
        return bench.main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    from baton_client import cli as client_cli
    return client_cli.COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
