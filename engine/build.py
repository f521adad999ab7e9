"""Assembling an engine: load the model, size the K/V slab, wire scheduler, runner and engine.

`build_engine` is what both transports call (in the server process for the in-thread engine, in
the engine process otherwise); `assemble_engine` does the wiring around an already loaded model
(tests, benchmarks).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from engine import model_loader
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.grammar import Grammars
from engine.kv_paged import PagedKV
from engine.kv_slab import KVSlab
from engine.memory import MemoryMonitor
from engine.prefix_cache import PrefixCache
from engine.model_runner import ModelRunner
from engine.scheduler import Scheduler, SchedulerConfig


@dataclass(frozen=True)
class ModelInfo:
    model_name: str
    max_context_length: int
    eos_token_ids: tuple[int, ...]
    max_new_tokens_limit: int
    default_max_new_tokens: int
    max_batch_size: int
    device: str
    dtype: str
    vocab_size: int
    has_chat_template: bool
    kv_slab_bytes: int
    decode: str = ""                 # the decode step the runner uses (ModelRunner.describe())
    decode_graphs: int = 0           # CUDA graphs captured for it (0: eager)


Loader = Callable[[], tuple]   # () -> (hf_model, tokenizer, ModelSpec); picklable for EngineProcess


def build_engine(config: EngineConfig, loader: Loader | None = None,
                 setup: Callable[[], None] | None = None) -> tuple[LLMEngine, ModelInfo, object]:
    """Load the model named by `config` (or whatever `loader` builds, e.g. a benchmark preset)
    and assemble an engine around it. `setup` (picklable): runs first in each tensor-parallel
    follower process, e.g. the server's log configuration."""
    shards = None
    device = model_loader.resolve_device(config.device)
    if config.tensor_parallel > 1:   # followers start and load while this process loads too
        from engine.tensor_parallel import Shards
        shards = Shards(config, loader, device, setup)
        device = shards.device
    try:
        if loader is None:
            dtype = model_loader.resolve_dtype(config.dtype, device)
            hf_model, tokenizer, spec = model_loader.load(config.model, device, dtype)
        else:
            hf_model, tokenizer, spec = loader()
        if shards is not None:
            from engine.tensor_parallel import shard_model, sharded_spec
            shards.wait_for("loaded")   # sharding's collectives start once every rank has its model
            shard_model(hf_model, shards.mesh, config.tp_allreduce, config.max_batch_size, config.tp_vocab_parallel)
            spec = sharded_spec(spec, shards.world)
        engine, info = assemble_engine(hf_model, tokenizer, spec, config, shards=shards)
    except BaseException:
        if shards is not None:
            shards.close()
        raise
    return engine, info, tokenizer


def resolve_kv_layout(layout: str, device_type: str) -> str:
    """auto -> what the benchmarks favour on each device (README, K/V layouts): paged on CUDA, the
    slab elsewhere; slab and paged stay."""
    return ("paged" if device_type == "cuda" else "slab") if layout == "auto" else layout


def assemble_engine(hf_model, tokenizer, spec: model_loader.ModelSpec,
                    config: EngineConfig, shards=None) -> tuple[LLMEngine, ModelInfo]:
    """Slab, scheduler, runner and engine around an already loaded model. With `shards`
    (engine.tensor_parallel.Shards, tensor parallelism): the model is this rank's shard, `spec`
    counts this rank's kv heads, and the followers are told the K/V storage to allocate."""
    device, dtype = hf_model.device, hf_model.dtype
    config = replace(config, kv_layout=resolve_kv_layout(config.kv_layout, device.type))
    max_seq_len = min(config.max_seq_len or min(spec.max_context, 4096), spec.max_context)
    bytes_per_token = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * dtype.itemsize
    monitor = MemoryMonitor(device, config.high_watermark, config.low_watermark)
    reserve = prefill_reserve_bytes(config, hf_model.config, max_seq_len, bytes_per_token, dtype.itemsize)
    if config.prefix_cache != "off":
        reserve += config.prefix_cache_device_bytes
    kv, num_slots = _kv_storage(config, spec, max_seq_len, bytes_per_token, monitor, dtype, device, reserve)
    monitor.exclude(kv.total_bytes)
    kv_budget = config.kv_budget_bytes if config.kv_budget_bytes is not None else kv.total_bytes
    page_size = config.kv_page_size if config.kv_layout == "paged" else 1
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    fused = config.fused_decode
    if fused is None:  # auto: on CUDA, for the model families it supports
        from engine.fused_decode import unsupported_reason
        fused = device.type == "cuda" and unsupported_reason(hf_model) is None
    graphs = config.cuda_graphs
    packed = config.packed_prefill is not False
    if shards is not None:
        # Sharded ranks run the step the device would run alone: the fused step on CUDA (each
        # rank's own heads, an all-reduce after o and after down), captured as CUDA graphs on
        # every rank in the same order (each graph holds its NCCL all-reduces, so replays meet);
        # the HF forward on CPU. The packed prefill too where the step is fused on pages: every
        # rank writes its heads' K/V into the same pages (same allocations, in the same order).
        graphs = shards.graphs = graphs and device.type == "cuda"
        from engine.tensor_parallel import Geometry
        shards.send(Geometry(layout=config.kv_layout, dims=kv.dims,
                             size=num_slots if config.kv_layout == "slab" else kv.num_pages,
                             page_size=page_size, max_seq_len=max_seq_len, max_rows=num_slots, pad_token_id=pad,
                             fused=fused, graphs=graphs,
                             packed=packed and fused and config.kv_layout == "paged"))
    if config.packed_prefill and not (fused and config.kv_layout == "paged"):
        raise ValueError("packed_prefill needs the paged layout and the fused decode step")
    runner = ModelRunner(hf_model, kv, device, pad_token_id=pad, cuda_graphs=graphs,
                         fused_decode=fused, packed_prefill=packed, **runner_options(config))
    scheduler = Scheduler(SchedulerConfig(
        max_batch_size=num_slots, max_prefill_tokens=config.max_prefill_tokens,
        kv_budget_tokens=min(kv_budget, kv.total_bytes) // bytes_per_token, max_row_tokens=max_seq_len,
        kv_bytes_per_token=bytes_per_token, host_budget_bytes=config.host_kv_budget_bytes,
        aging_seconds=config.aging_seconds, kv_page_size=page_size,
        prefill_chunk_tokens=config.prefill_chunk_tokens, prefill_padded=runner.packed is None))
    prefix_cache = None
    if config.prefix_cache != "off":
        prefix_cache = PrefixCache(config.prefix_cache, config.kv_page_size, kv.dims, dtype, device,
                                   config.prefix_cache_device_bytes, config.prefix_cache_host_bytes,
                                   bring_up=config.prefix_cache_bring_up)
    engine = LLMEngine(runner, scheduler, tokenizer, spec.eos_token_ids, seed=config.seed, prefix_cache=prefix_cache,
                       pressure=monitor.pressure,
                       pinned_arena_bytes=min(config.pinned_arena_bytes, config.host_kv_budget_bytes),
                       prefill_max_waste=1.0 if device.type == "cuda" else 0.1,
                       grammars=Grammars(tokenizer, spec.vocab_size, spec.eos_token_ids), shards=shards,
                       decode_before_prefill=(device.type == "cuda" if config.decode_before_prefill is None
                                              else config.decode_before_prefill),
                       overlap_decode=device.type == "cuda" if config.overlap_decode is None else config.overlap_decode,
                       pipeline_decode=config.pipeline_decode)
    info = ModelInfo(
        model_name=spec.name, max_context_length=max_seq_len, eos_token_ids=spec.eos_token_ids,
        max_new_tokens_limit=config.max_new_tokens_limit, default_max_new_tokens=config.default_max_new_tokens,
        max_batch_size=num_slots, device=str(device), dtype=str(dtype).removeprefix("torch."),
        vocab_size=spec.vocab_size, has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
        kv_slab_bytes=kv.total_bytes, decode_graphs=runner.num_graphs,
        decode=runner.describe() + (f", tensor parallel {shards.world}" if shards else ""))
    return engine, info


def runner_options(config: EngineConfig) -> dict:
    """ModelRunner's settings that come from the configuration alone, the same on every
    tensor-parallel rank (rank 0 here, each follower in tensor_parallel.follow): the ranks capture
    and replay the same graphs, whose collectives must meet."""
    return dict(decode_split_kv=config.decode_split_kv, decode_num_stages=config.decode_num_stages,
                decode_kv_block=config.decode_kv_block, decode_sort_rows=config.decode_sort_rows,
                fused_epilogues=config.fused_epilogues, fused_add_norm=config.fused_add_norm,
                fused_rope_store=config.fused_rope_store, prefill_graphs=config.use_prefill_graphs,
                max_prefill_tokens=config.max_prefill_tokens, prefill_graph_tokens=config.use_prefill_graph_tokens,
                chunk_graphs=config.tensor_parallel == 1)   # chunk graphs: each rank's one workspace


def prefill_reserve_bytes(config: EngineConfig, model_config, max_seq_len: int, bytes_per_token: int,
                          itemsize: int) -> int:
    """Device memory a prefill needs beside the K/V pool, left free when the pool is sized: the
    forward's own K/V (a grouped forward's tokens; chunked, also the partial K/V of up to two
    prompts in progress) and its activations (per token: the residual and q/k/v/o in hidden
    size, gate/up/act in intermediate size; doubled for the allocator's slack); with prefill
    graphs, also the chunk graphs' workspace (fused_prefill.StaticChunk: a context plus the
    largest bucket); with a host tier, the partial K/V of prompts held while their cached prefix
    comes up from host memory (the scheduler keeps them within another `max_prefill_tokens`)."""
    tokens = config.prefill_chunk_tokens or config.max_prefill_tokens
    kv_tokens = tokens + (2 * max_seq_len if config.prefill_chunk_tokens else 0)
    if config.prefix_cache == "device+host":
        kv_tokens += config.max_prefill_tokens
    if config.use_prefill_graphs and config.tensor_parallel == 1:   # no chunk graphs under TP
        kv_tokens += max_seq_len + min(config.use_prefill_graph_tokens, config.max_prefill_tokens)
    hidden = getattr(model_config, "hidden_size", 0)
    intermediate = getattr(model_config, "intermediate_size", None) or 4 * hidden
    activations = 2 * tokens * (6 * hidden + 3 * intermediate) * itemsize
    return kv_tokens * bytes_per_token + activations


def _kv_storage(config: EngineConfig, spec: model_loader.ModelSpec, max_seq_len: int, bytes_per_token: int,
                monitor: MemoryMonitor, dtype, device, reserve: int) -> tuple[KVSlab | PagedKV, int]:
    """The batch's K/V storage and its number of rows. The slab reserves a full context per row,
    so memory bounds the rows; pages are spent only on tokens that exist, so memory bounds the
    tokens and `max_batch_size` alone bounds the rows."""
    dims = (spec.num_layers, spec.num_kv_heads, spec.head_dim)
    if config.kv_layout == "slab":
        num_slots = monitor.slab_slots(config.max_batch_size, bytes_per_token * max_seq_len,
                                       config.kv_memory_fraction, reserve)
        return KVSlab(*dims, num_slots, max_seq_len, dtype, device), num_slots
    page = config.kv_page_size
    # At most what a full slab of max_batch_size rows would hold; on CUDA, what free memory allows.
    wanted = -(-config.max_batch_size * max_seq_len // page)
    if config.kv_budget_bytes is not None:
        wanted = min(wanted, -(-config.kv_budget_bytes // (page * bytes_per_token)))
    num_pages = monitor.slab_slots(wanted, page * bytes_per_token, config.kv_memory_fraction, reserve)
    if num_pages * page < max_seq_len:
        raise RuntimeError(f"K/V memory for {num_pages} pages cannot hold one row of {max_seq_len} tokens")
    return PagedKV(*dims, num_pages, page, max_seq_len, config.max_batch_size, dtype, device), config.max_batch_size
