"""Engine configuration: one frozen dataclass, validated on construction.

Only the entry point (service/cli.py) reads flags and the environment; everything below gets
an `EngineConfig`.
"""
from __future__ import annotations

from dataclasses import dataclass

DEVICES = ("auto", "cpu", "cuda")
KV_LAYOUTS = ("auto", "slab", "paged")
PREFIX_CACHE_MODES = ("off", "device", "device+host")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# The largest prefill forward that replays a CUDA graph, per GPU of the tensor-parallel group: past
# it a 7B prefill's GPU time exceeds the eager forward's host time at TP 1 (notes 26-27). A rank's
# GPU time per token shrinks with the group, its host time does not (the collectives' calls add
# to it), so under TP the crossover moves up with the ranks: at TP 2 a 1,567-token eager forward
# took 68 ms of wall for 32 ms of GPU time (docs/benchmarks.md note 34).
PREFILL_GRAPH_TOKENS_PER_GPU = 1280


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None              # local HF folder; None = built-in SmolLM2-135M-Instruct
    device: str = "auto"                  # auto picks cuda when available
    dtype: str = "auto"                   # auto: bfloat16 on cuda, float32 on cpu
    max_batch_size: int = 16              # rows (slots) in the decode batch
    max_seq_len: int | None = None        # K/V columns per row; None = min(model context, 4096)
    default_max_new_tokens: int = 256     # when a request says 0
    max_new_tokens_limit: int = 4096      # larger requests are rejected
    max_queue: int = 1024                 # requests waiting or parked; more gets RESOURCE_EXHAUSTED
    max_prefill_tokens: int = 8192        # prompt tokens one prefill forward computes (padded, unless packed)
    kv_budget_bytes: int | None = None    # device K/V bytes the batch may use; None = the slab's size
    host_kv_budget_bytes: int = 8 << 30   # parked K/V bytes in host memory
    pinned_arena_bytes: int = 4 << 30     # of those, pre-pinned once at start (CUDA): fast offload
    aging_seconds: float = 30.0           # a waiting request gains one priority level per this many s (0 = off)
    high_watermark: float = 0.95          # device memory fraction above which rows are parked (CUDA)
    low_watermark: float = 0.85           # below which parked rows come back / more are admitted (CUDA)
    kv_memory_fraction: float = 0.85      # share of free device memory the K/V slab may take (CUDA)
    seed: int = 0                         # seeds the draw of per-request seeds when none is given
    warmup: bool = True                   # run one short generation before reporting SERVING
    cuda_graphs: bool = True              # replay decode steps as CUDA graphs (CUDA only)
    fused_decode: bool | None = None      # fused-kernel decode step (Llama/Mistral/Qwen2); None = on for CUDA
    kv_layout: str = "auto"               # slab: the paper's padded slab; paged: pages of kv_page_size tokens;
                                          # auto: paged on CUDA, slab on CPU (docs/benchmarks.md note 21)
    kv_page_size: int = 128               # tokens per K/V page (paged layout)
    packed_prefill: bool | None = None    # prefill newcomers packed, straight into pages (paged + fused);
                                          # None = wherever the fused decode step runs on pages
    prefill_chunk_tokens: int = 0         # prompt tokens prefilled per step between decode steps (0 = whole prompts)
    prefix_cache: str = "off"             # off | device | device+host: K/V of prefixes kept across requests
    prefix_cache_device_bytes: int = 1 << 30   # its device tier (taken before the K/V pool is sized)
    prefix_cache_host_bytes: int = 4 << 30     # its host tier (device+host)
    prefix_cache_bring_up: float = 1.0    # host-only blocks one load or insert brings back to the device tier, as a
                                          # fraction of its slots (1: all; 0: never), notes 30-31
    tensor_parallel: int = 1              # ranks the model is sharded over (one engine worker process each)
    tp_allreduce: str = "auto"            # auto | nccl | one-shot | fused: how the ranks sum a row-parallel linear's outputs;
                                          # one-shot = symmetric memory's for a decode step's (CUDA), NCCL for the rest
                                          # (note 30); fused = that sum, the residual add and the RMSNorm as one kernel in
                                          # the fused step (engine/allreduce_norm.py, CUDA bf16), NCCL elsewhere (note 32);
                                          # auto = fused on CUDA in bf16, else nccl
    tp_vocab_parallel: bool = True        # tensor parallel, fused step: each rank computes its V / n rows of the LM head
                                          # and the logits are gathered (tensor_parallel.vocab_parallel_head), note 34
    decode_split_kv: int = 0              # paged decode: programs per row and kv head in flex's decode kernel
                                          # (SPLIT_KV); 0 = flex's choice (docs/benchmarks.md note 25)
    decode_num_stages: int = 2            # paged decode: flex's decode kernel loads K/V blocks this many deep
                                          # (num_stages); 0 = flex's choice (1 on an H200: each block waits for
                                          # its load). 2: -13 to -25% a layer's attention at batch 32 (note 34)
    decode_kv_block: int = 128            # paged decode: K/V tokens a program loads at once (flex's BLOCK_N), where
                                          # the page size is a multiple of it; 0 = flex's choice (64). With 2 stages:
                                          # a further -11 to -16% at batch 32, same at 128 (note 34)
    decode_sort_rows: bool = True         # paged decode: each step runs its rows longest first (note 27)
    fused_epilogues: bool = True          # fused step: RMSNorm scales and residual adds inside their kernels (note 27)
    fused_add_norm: bool | None = None    # fused step: a residual add not inside a GEMM and the RMSNorm after it as one
                                          # kernel, every other RMSNorm liger's too (liger-kernel, CUDA); None = on CUDA
                                          # (notes 30, 32)
    fused_rope_store: bool | None = None  # paged fused decode: rotary and the K/V write as one Triton kernel a layer
                                          # (engine/rope_store.py); None = on CUDA (note 31)
    prefill_graphs: bool | None = None    # packed whole-prompt prefill forwards of up to prefill_graph_tokens tokens
                                          # replay a CUDA graph per token bucket (fused_prefill.StaticPrefill), and so
                                          # do one prompt's chunks at a time (StaticChunk, TP 1 only); CUDA with CUDA
                                          # graphs only (the runner checks); None = on (before note 34: at TP 1 only,
                                          # the graphs stopped at 1,280 tokens). Notes 27, 29, 34
    prefill_graph_tokens: int | None = None   # the largest prefill forward that replays a graph; None = 1,280 per
                                          # GPU of the tensor-parallel group (PREFILL_GRAPH_TOKENS_PER_GPU above)
    decode_before_prefill: bool | None = None   # a step with prefill work launches its decode step first, so
                                          # the host issues the prefill while the GPU decodes (LLMEngine.step_phases);
                                          # None = on CUDA only (on CPU nothing overlaps: new rows would just wait a step)
    overlap_decode: bool | None = None    # a steady step launches the next decode step before its detokenising and
                                          # events, so the GPU decodes while the host does them (LLMEngine.step_phases);
                                          # None = on CUDA only (on CPU nothing overlaps), note 28
    pipeline_decode: bool = True          # with overlap_decode: a steady step launches the next decode from the sampled
                                          # ids on the device, before the host reads them (LLMEngine._finish_decode), note 33

    @property
    def use_prefill_graphs(self) -> bool:
        """prefill_graphs resolved: None = on, at every tensor-parallel size (the runner adds: CUDA,
        CUDA graphs on)."""
        return self.prefill_graphs is not False

    @property
    def use_prefill_graph_tokens(self) -> int:
        """prefill_graph_tokens resolved: None = 1,280 tokens per GPU of the tensor-parallel group
        (a rank's GPU time per token shrinks with the group, the eager forward's host time does not)."""
        return self.prefill_graph_tokens or PREFILL_GRAPH_TOKENS_PER_GPU * self.tensor_parallel

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.kv_layout not in KV_LAYOUTS:
            raise ValueError(f"kv_layout must be one of {KV_LAYOUTS}, got {self.kv_layout!r}")
        if self.prefix_cache not in PREFIX_CACHE_MODES:
            raise ValueError(f"prefix_cache must be one of {PREFIX_CACHE_MODES}, got {self.prefix_cache!r}")
        if self.prefill_chunk_tokens < 0:
            raise ValueError(f"prefill_chunk_tokens must be >= 0, got {self.prefill_chunk_tokens}")
        if self.kv_page_size < 1:
            raise ValueError(f"kv_page_size must be >= 1, got {self.kv_page_size}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        for name in ("max_batch_size", "default_max_new_tokens", "max_new_tokens_limit",
                     "max_queue", "max_prefill_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2, got {self.max_seq_len}")
        if self.default_max_new_tokens > self.max_new_tokens_limit:
            raise ValueError("default_max_new_tokens must not exceed max_new_tokens_limit")
        if not 0.0 < self.low_watermark <= self.high_watermark <= 1.0:
            raise ValueError("watermarks must satisfy 0 < low_watermark <= high_watermark <= 1")
        if self.prefill_graph_tokens is not None and self.prefill_graph_tokens < 1:
            raise ValueError(f"prefill_graph_tokens must be >= 1, got {self.prefill_graph_tokens}")
        if self.decode_kv_block < 0:
            raise ValueError(f"decode_kv_block must be >= 0, got {self.decode_kv_block}")
        if self.decode_num_stages < 0:
            raise ValueError(f"decode_num_stages must be >= 0, got {self.decode_num_stages}")
        if self.decode_split_kv < 0:
            raise ValueError(f"decode_split_kv must be >= 0, got {self.decode_split_kv}")
        if self.tensor_parallel < 1:
            raise ValueError(f"tensor_parallel must be >= 1, got {self.tensor_parallel}")
        if not 0.0 <= self.prefix_cache_bring_up <= 1.0:
            raise ValueError(f"prefix_cache_bring_up must be within [0, 1], got {self.prefix_cache_bring_up}")
        if self.tp_allreduce not in ("auto", "nccl", "one-shot", "fused"):
            raise ValueError(f"tp_allreduce must be one of ('auto', 'nccl', 'one-shot', 'fused'), got {self.tp_allreduce!r}")
        if self.aging_seconds < 0:
            raise ValueError(f"aging_seconds must be >= 0, got {self.aging_seconds}")
