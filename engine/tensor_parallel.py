"""Tensor parallelism: one engine worker process per rank, the model sharded Megatron-style.

    rank 0 (the engine: scheduler, sampling, all bookkeeping)       ranks 1..N-1 (followers)
    LLMEngine ──one message per K/V or model operation (pipe)──▶   Follower: the same operation
        │                                                              on its own shard
        └──── all-reduces inside the sharded linears (torch.distributed: gloo / NCCL) ────┘

Sharding is PyTorch's tensor-parallel API driven by the model's own plan (transformers'
`base_model_tp_plan`: q/k/v and gate/up column-parallel, o and down row-parallel, one all-reduce
after attention and one after the MLP). Embeddings and the LM head stay whole on every rank, so
every rank computes the same logits; only rank 0 samples. Each rank's K/V storage (slab or
pages) holds only its kv heads (num_kv_heads / N): parking or restoring a row moves each rank's
shard between its device and host memory.

Followers hold no request state: rank 0 sends each operation on its K/V storage and each forward
(`Prefill`, `PackedPrefill`, `Embed`, `Park`, `Restore`, `Drop`, `Reserve`, `Chunk`,
`EmbedChunked`, `CacheLoad`, `CacheInsert`, `Decode`) before running it itself, in the order it
runs them, so every rank's storage (and prefix cache) goes through the same states and every
forward meets its peers in the same collectives. On CUDA each rank replays its decode steps as
CUDA graphs captured in the same order, each holding the step's all-reduces. A pipelined decode
step (LLMEngine._finish_decode) has no ids in its message: rank 0 broadcasts its sampled ids to
the followers on the devices (`share_ids`), queued behind its sampling and ahead of the step.

Failure: a rank that dies (or a step that fails: the ranks may then be out of step) ends the
engine: `LLMEngine.fail_batch` raises `ShardLost` from the loop's handler of a failed step, so
the loop ends and every open stream ends UNAVAILABLE as when the engine itself dies; the server
restarts the engine with its followers. A follower exits when rank 0's pipe closes or a
collective fails because a peer is gone. Under NCCL a collective whose peer died may never
return, so on CUDA a thread of rank 0 watches the followers (`watch_ranks`).
"""
from __future__ import annotations

import multiprocessing
import os
import threading
import time
import traceback
from dataclasses import dataclass, replace
from typing import Union

import msgspec
import structlog
import torch

from engine.child_process import prepare_child

log = structlog.get_logger("baton.engine")

# NVLink multicast off: on the shared GPU hosts it can take every GPU out of service. Set before
# any process group exists; spawned followers inherit it.
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
STYLES = ("colwise", "rowwise")


class ShardLost(Exception):
    """A tensor-parallel rank died or the ranks may be out of step: the engine cannot go on."""


# ---- messages from rank 0 -----------------------------------------------------------------------
class Geometry(msgspec.Struct, tag=True, array_like=True):
    """The K/V storage rank 0 sized; each follower allocates the same (for its own kv heads)."""
    layout: str                  # "slab" | "paged"
    dims: tuple[int, int, int]   # (layers, kv heads of this rank, head dim)
    size: int                    # slab: rows; paged: pages
    page_size: int
    max_seq_len: int
    max_rows: int
    pad_token_id: int
    fused: bool = False          # the fused decode step on every rank
    graphs: bool = False         # decode steps as CUDA graphs, captured on every rank in one order
    packed: bool = False         # prefill packed, straight into pages (engine/fused_prefill.py)


class Prefill(msgspec.Struct, tag=True, array_like=True):
    prompts: list[list[int]]


class PackedPrefill(msgspec.Struct, tag=True, array_like=True):
    """The packed prefill: prompts[i]'s K/V written straight into new pages of row row_ids[i];
    in the same forward each chunk (row_id, prompt_len, ids, start) into that request's partial
    K/V, as Chunk does."""
    prompts: list[list[int]]
    row_ids: list[str]
    chunks: list[tuple[str, int, list[int], int]] = []


class Embed(msgspec.Struct, tag=True, array_like=True):
    """Row `index` of the last Prefill (or PackedPrefill: a copy of its row) joins the batch as `row_id`."""
    row_id: str
    index: int


class Reserve(msgspec.Struct, tag=True, array_like=True):
    longest: int


class Park(msgspec.Struct, tag=True, array_like=True):
    row_id: str


class Restore(msgspec.Struct, tag=True, array_like=True):
    row_id: str


class Drop(msgspec.Struct, tag=True, array_like=True):
    """Free whatever K/V the request holds: its row, its parked copy, its partial prefill."""
    row_id: str


class Chunk(msgspec.Struct, tag=True, array_like=True):
    row_id: str
    prompt_len: int
    ids: list[int]
    start: int


class EmbedChunked(msgspec.Struct, tag=True, array_like=True):
    """The request's whole prompt is in its partial K/V: it joins the batch as `row_id`. With
    `source` (n completions: the request whose partial K/V each of its rows copies) the partial
    K/V stay until a Drop of `source`; without, they are the row's own and go now."""
    row_id: str
    length: int
    source: str = ""


class CacheLoad(msgspec.Struct, tag=True, array_like=True):
    """The request starts a partial K/V (chunked prefill): copy its prompt's cached prefix in."""
    row_id: str
    prompt_ids: list[int]


class CacheInsert(msgspec.Struct, tag=True, array_like=True):
    """Keep the K/V of `token_ids`' full blocks in the prefix cache, from one source: the row
    `row_id`, prompt `index` of the last Prefill, or the partial K/V of request `partial`."""
    token_ids: list[int]
    row_id: str = ""
    index: int = -1
    partial: str = ""


class Decode(msgspec.Struct, tag=True, array_like=True):
    input_ids: list[int]
    on_device: bool = False   # the ids are rank 0's last draw for every row, shared on the devices (share_ids)


class Stop(msgspec.Struct, tag=True, array_like=True):
    pass


Message = Union[Geometry, Prefill, PackedPrefill, Embed, Reserve, Park, Restore, Drop, Chunk, EmbedChunked,
                CacheLoad, CacheInsert, Decode, Stop]
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Message).decode


# ---- sharding -------------------------------------------------------------------------------------
def shard_model(hf_model, mesh, allreduce: str = "auto", max_rows: int = 256, vocab_parallel: bool = True) -> None:
    """Shard the model in place over `mesh` with PyTorch's tensor-parallel styles, following the
    model family's own plan (transformers' `base_model_tp_plan`). Raises ValueError when the
    family has no plain column/row plan or its heads do not divide among the ranks. `allreduce`:
    how a row-parallel linear's partial outputs are summed (EngineConfig.tp_allreduce); "fused"
    also gives the fused decode step the all-reduce + add + RMSNorm kernel for up to `max_rows`
    rows (engine/allreduce_norm.py; the engine passes a decode step's, so a prefill's larger sums
    take NCCL: a prefill's rows through the kernel gained nothing at 7B, note 35). `vocab_parallel`: the fused step's LM head too
    (`vocab_parallel_head`)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    cfg, n = hf_model.config, mesh.size()
    plan = getattr(cfg, "base_model_tp_plan", None) or {}
    if not plan or any(style not in STYLES for style in plan.values()):
        raise ValueError(f"tensor_parallel: model type {cfg.model_type!r} has no column/row tensor-parallel plan "
                         f"(supported: the Llama, Mistral and Qwen2 families)")
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    for name, value in (("attention heads", heads), ("kv heads", kv_heads),
                        ("intermediate size", cfg.intermediate_size)):
        if value % n:
            raise ValueError(f"tensor_parallel: {n} does not divide the model's {value} {name}")
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}   # outputs: local tensors
    parallelize_module(hf_model.model, mesh, {name: styles[style]() for name, style in plan.items()})
    if any(p.is_meta for p in hf_model.parameters()):
        device = torch.device("cuda", torch.cuda.current_device()) if mesh.device_type == "cuda" else torch.device("cpu")
        materialize_random(hf_model, device)
    allreduce = resolve_allreduce(allreduce, mesh.device_type, hf_model.dtype)
    shards = _run_on_local_shards(hf_model.model, mesh, {name for name, style in plan.items() if style == "rowwise"},
                                  sum_over_ranks(mesh.get_group(), mesh.device_type, hf_model.dtype, allreduce))
    if allreduce == "fused":
        shards = replace(shards, all_reduce_add_norm=fused_all_reduce_norm(mesh, cfg.hidden_size, hf_model.dtype, max_rows))
    if vocab_parallel:
        shards = replace(shards, vocab_gather=vocab_parallel_head(hf_model.lm_head, mesh))
    hf_model._baton_tp = shards


def vocab_parallel_head(lm_head, mesh):
    """The fused step's LM head split by vocabulary rows (Megatron's vocab-parallel output layer):
    each rank computes the logits of its own V / n rows (a view of the weight: the HF forward keeps
    the whole head) and one all-gather puts every rank's logits together, so a rank reads 1 / n of
    the head's weights a step instead of all of them (7B: 262 MB, ~0.1 ms on an H200, note 34).
    Each logit is the same dot product either way. -> (the rows, gather(local) -> [B, V]), or None
    where the head has a bias or n does not divide V (the head then stays whole on every rank)."""
    import torch.distributed as dist
    weight, n, rank = lm_head.weight, mesh.size(), mesh.get_local_rank()
    vocab = weight.shape[0]
    if lm_head.bias is not None or vocab % n:
        return None
    part = vocab // n
    group = mesh.get_group()
    # torch 2.13 renamed all_gather_into_tensor (deprecated there) to all_gather_single; 2.11 has only the old name
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

    def gather(local: torch.Tensor) -> torch.Tensor:
        rows = local.shape[0]
        out = torch.empty(n * rows, part, dtype=local.dtype, device=local.device)
        all_gather(out, local.contiguous(), group=group)
        return out.view(n, rows, part).transpose(0, 1).reshape(rows, vocab)   # rank r's part: columns [r*V/n, ...)
    return weight.detach()[rank * part:(rank + 1) * part], gather


def resolve_allreduce(choice: str, device_type: str, dtype: torch.dtype) -> str:
    """EngineConfig.tp_allreduce "auto" -> "fused" on CUDA in bf16 (bit-equal to NCCL + liger's
    add-norm and faster, note 32), "nccl" elsewhere; any other choice as it is."""
    if choice != "auto":
        return choice
    return "fused" if device_type == "cuda" and dtype == torch.bfloat16 else "nccl"


def fused_all_reduce_norm(mesh, hidden: int, dtype: torch.dtype, max_rows: int):
    """-> engine/allreduce_norm.py's kernel for this group, or None (logged) off CUDA or bf16, or
    where it cannot be built (no symmetric memory in this torch, Triton cannot compile it): the
    step then all-reduces with NCCL and adds apart. Every rank decides alike (same torch, same host)."""
    if mesh.device_type != "cuda" or dtype != torch.bfloat16:
        log.warning("tp_allreduce_fused_unavailable", reason=f"needs CUDA and bf16 ({mesh.device_type}, {dtype})")
        return None
    try:
        from engine.allreduce_norm import FusedAllReduceNorm
        return FusedAllReduceNorm(mesh.get_group(), max_rows, hidden, dtype)
    except Exception as exc:  # noqa: BLE001 - any failure to build it: the NCCL path instead
        log.warning("tp_allreduce_fused_unavailable", reason=repr(exc)[:300])
        return None


@dataclass(frozen=True)
class LocalShards:
    """What the fused step needs of a sharded model (`hf_model._baton_tp`): the sum over the
    ranks of a row-parallel linear's partial output, and whether any such linear has a bias
    (added once after the sum; the fused step does not do that), and where tp_allreduce is
    "fused", the all-reduce + residual add + RMSNorm kernel (None where it is not)."""
    all_reduce: object
    rowwise_bias: bool
    all_reduce_add_norm: object = None
    vocab_gather: object = None   # vocab_parallel_head's: (this rank's rows of the LM head, the logits' gather)


TP_ALLREDUCE = ("auto", "nccl", "one-shot", "fused")
ONE_SHOT_MAX_BYTES = 1 << 20   # partial outputs up to this size take the one-shot all-reduce ("one-shot")


def sum_over_ranks(group, device_type: str, dtype: torch.dtype, choice: str = "nccl",
                   max_bytes: int = ONE_SHOT_MAX_BYTES):
    """-> f(tensor) -> the sum of `tensor` over the ranks of `group` (may be `tensor` itself, summed
    in place). "nccl" (and always on CPU): c10d's all_reduce (NCCL / gloo). "one-shot" on CUDA: partial
    outputs of up to `max_bytes` (a decode step's) take symmetric memory's one-shot
    all-reduce: each rank copies its part into its buffer, then reads its peers' straight over
    NVLink (P2P, no multicast: TORCH_SYMM_MEM_DISABLE_MULTICAST stays set) and sums, one kernel with
    a barrier on each side, captured in the decode step's CUDA graph like NCCL's. Larger ones (a
    prefill's) stay with NCCL. The sum of two ranks' parts is the same either way (one rounding of
    a + b). Falls back to NCCL (logged) where this torch has no symmetric memory.
    Measured (2x H200, note 30): 9.4 against 15.4 us an op in a graph of back-to-back all-reduces,
    but no faster inside the decode step (NCCL's there: ~10 us), so NCCL stays the default."""
    import torch.distributed as dist

    def nccl(tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, group=group)
        return tensor
    if choice not in TP_ALLREDUCE[1:]:   # "auto" is resolved before (resolve_allreduce)
        raise ValueError(f"tp_allreduce must be one of {TP_ALLREDUCE}, got {choice!r}")
    nccl.kind = "nccl"
    if choice in ("nccl", "fused") or device_type != "cuda":   # fused: NCCL where the fused kernel does not serve
        return nccl
    try:
        import torch.distributed._symmetric_memory as symm_mem
        op = torch.ops.symm_mem.one_shot_all_reduce_copy
        if hasattr(symm_mem, "get_backend") and symm_mem.get_backend(torch.device("cuda")) != "CUDA":
            symm_mem.set_backend("CUDA")   # CUDA's own P2P buffers (not NVSHMEM): the ops below are its
        buffer = symm_mem.empty(max_bytes // dtype.itemsize, dtype=dtype,
                                device=torch.device("cuda", torch.cuda.current_device()))
    except (ImportError, AttributeError, RuntimeError) as exc:   # the same on every rank: same torch, same host
        log.warning("tp_allreduce_nccl", reason=repr(exc)[:300])
        return nccl
    symm_mem.rendezvous(buffer, group.group_name)
    name, limit = group.group_name, buffer.numel()

    def one_shot(tensor: torch.Tensor) -> torch.Tensor:
        n = tensor.numel()
        if n > limit or tensor.dtype != buffer.dtype or not tensor.is_contiguous():
            return nccl(tensor)
        return op(buffer[:n], tensor.view(-1), "sum", name).view(tensor.shape)
    one_shot.kind = "one_shot"
    return one_shot


def _run_on_local_shards(inner, mesh, rowwise_patterns: set[str], all_reduce) -> LocalShards:
    """After parallelize_module: each parameter becomes its rank's local shard (a plain tensor)
    and the styles' hooks go; a row-parallel linear's partial output is summed over the ranks by
    one all_reduce (then its bias, if any, is added once). The same arithmetic and collectives as
    the DTensor forward, without DTensor's per-op sharding propagation, which cost ~10 ms a linear
    on CPU when the decode batch's shape changes every step (benchmarks/profile_tp.py, note 22).
    `all_reduce`: sum_over_ranks' function."""
    import fnmatch
    rowwise_bias = False
    for name, module in inner.named_modules():
        params = dict(module.named_parameters(recurse=False))
        if not any(hasattr(p, "to_local") for p in params.values()):
            continue
        for pname, param in params.items():
            if hasattr(param, "to_local"):
                setattr(module, pname, torch.nn.Parameter(param.to_local(), requires_grad=False))
        module._forward_pre_hooks.clear()
        module._forward_hooks.clear()
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in rowwise_patterns):
            bias = module.bias
            module.bias = None
            rowwise_bias = rowwise_bias or bias is not None

            def reduce(_module, _inputs, output, bias=bias):
                output = all_reduce(output)
                return output if bias is None else output + bias
            module.register_forward_hook(reduce)
    return LocalShards(all_reduce, rowwise_bias)


@torch.no_grad()
def materialize_random(hf_model, device: torch.device) -> None:
    """A model built on the meta device and sharded: allocate each rank's shards on `device` and
    fill them with random weights (norms 1, the rest N(0, initializer_range)), so a model larger
    than one device is never whole on any rank (benchmark presets: random weights by design).
    Whole (replicated) parameters get the same values on every rank: each parameter's generator
    is seeded from its name."""
    import zlib
    hf_model.to_empty(device=device)
    std = getattr(hf_model.config, "initializer_range", 0.02)
    for name, param in hf_model.named_parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        if "norm" in name:
            local.fill_(1.0)
        else:
            generator = torch.Generator(device=device).manual_seed(zlib.crc32(name.encode()))
            local.normal_(0.0, std, generator=generator)
    inner = hf_model.model   # buffers computed at construction (rotary frequencies) are gone: rebuild
    with torch.device(device):
        inner.rotary_emb = type(inner.rotary_emb)(config=hf_model.config)


def sharded_spec(spec, world: int):
    """The model's spec as one rank sees it: its share of the kv heads."""
    return replace(spec, num_kv_heads=spec.num_kv_heads // world)


def share_ids(ids: torch.Tensor) -> torch.Tensor:
    """Rank 0's sampled ids [n] (long, on its device) into `ids` on every rank: a pipelined decode
    step's inputs (LLMEngine._finish_decode), sent device to device, queued behind rank 0's
    sampling and ahead of the step, so no host waits for them."""
    import torch.distributed as dist
    dist.broadcast(ids, src=0)
    return ids


def rank_device(device: torch.device, rank: int) -> torch.device:
    return torch.device("cuda", rank) if device.type == "cuda" else device


def _join_group(rank: int, world: int, store, device: torch.device):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    if device.type == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank, world_size=world)
    return init_device_mesh(device.type, (world,))


# ---- rank 0 -----------------------------------------------------------------------------------------
class Shards:
    """Rank 0's side: starts the followers, joins the process group, sends them each operation."""

    def __init__(self, config, loader, device: torch.device, setup=None) -> None:
        import torch.distributed as dist
        for key, value in SAFE_ENV.items():
            os.environ.setdefault(key, value)
        if dist.is_initialized():
            raise RuntimeError("tensor_parallel: this process already belongs to a process group (an earlier "
                               "engine's, left after its CUDA graphs: start the new one in a fresh process)")
        self.world = config.tensor_parallel
        # The rendezvous store on a port the OS picks (no race for a "free" port).
        store = dist.TCPStore("127.0.0.1", 0, self.world, is_master=True, wait_for_workers=False)
        ctx = multiprocessing.get_context("spawn")   # CUDA cannot be used in a forked child
        self._pipes, self._processes = [], []
        for rank in range(1, self.world):
            ours, theirs = ctx.Pipe(duplex=False)
            # Daemonic: if rank 0 exits, multiprocessing ends them rather than waiting on them.
            process = ctx.Process(target=follow, name=f"baton-tp-rank{rank}", daemon=True,
                                  args=(ours, rank, self.world, store.port, config, loader, setup))
            process.start()
            ours.close()
            self._pipes.append(theirs)
            self._processes.append(process)
            log.info("tp_follower_started", rank=rank, pid=process.pid)
        self._store = store
        self._closed = False
        self.graphs = False    # the ranks captured NCCL collectives in CUDA graphs (see close)
        self.device = rank_device(device, 0)
        if self.device.type == "cuda":
            # A collective whose peer died never returns under NCCL (a captured one is not even
            # watched by its timeout), so rank 0 might never notice: watch the followers instead.
            threading.Thread(target=watch_ranks, name="baton-tp-watch", daemon=True,
                             args=(self._processes, lambda: self._closed, RANK_LOST_GRACE_S, _exit_stuck)).start()
        self.wait_for("up")   # every follower runs, before a rendezvous that would wait for a dead one
        self.mesh = _join_group(0, self.world, store, self.device)

    def wait_for(self, stage: str) -> None:
        """Until every follower has reached `stage` (it sets a key in the store); raises
        RuntimeError at once if one exits first (no collective waits for a dead rank at start)."""
        keys = [f"{stage}/{rank}" for rank in range(1, self.world)]
        while not self._store.check(keys):
            if any(p.exitcode is not None for p in self._processes):
                dead = self._dead()
                self.close(timeout=2.0)
                raise RuntimeError(f"tensor-parallel start-up failed: {dead} (its error is in the log)")
            time.sleep(0.05)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._processes]

    def send(self, message) -> None:
        """One operation to every follower, before rank 0 runs it. Raises ShardLost if one is gone."""
        data = _encode(message)
        try:
            for pipe in self._pipes:
                pipe.send_bytes(data)
        except OSError as exc:
            raise ShardLost(f"tensor-parallel rank gone: {self._dead() or exc!r}") from exc

    def lost(self, exc: BaseException) -> ShardLost:
        """A step failed: under tensor parallelism the ranks may be out of step (or one died).
        Ends the followers and leaves the process group (so this process may start another engine,
        e.g. the in-thread transport's restart). -> the error to raise."""
        error = ShardLost(f"tensor-parallel step failed ({self._dead() or 'ranks out of step'}): {exc!r}")
        self.close(timeout=2.0)   # a follower waiting in a collective rank 0 left never reads Stop
        return error

    def _dead(self) -> str:
        for process in self._processes:
            process.join(0.5 if process.is_alive() else 0)   # a peer's socket closes as it exits
        return ", ".join(f"rank {i + 1} exited ({p.exitcode})" for i, p in enumerate(self._processes)
                         if p.exitcode is not None)

    def close(self, timeout: float = 10.0) -> None:
        if self._closed:
            return
        self._closed = True
        import torch.distributed as dist
        for pipe in self._pipes:
            try:
                pipe.send_bytes(_encode(Stop()))
                pipe.close()
            except OSError:
                pass
        for process in self._processes:
            process.join(timeout)
            if process.is_alive():
                process.kill()
                process.join(5)
        # Once NCCL collectives were captured in CUDA graphs, destroy_process_group and
        # _abort_process_group both hang (pytorch/pytorch#115388, open; both seen on 2x H200,
        # torch 2.11), while a plain process exit does not: the group is left to the exit. This
        # process cannot then start another tensor-parallel engine (Shards refuses, clearly).
        if dist.is_initialized() and not self.graphs:
            dist.destroy_process_group()


RANK_LOST_GRACE_S = 30.0   # how long rank 0 has to notice a dead follower itself (ShardLost)


def watch_ranks(processes, closed, grace_s: float, on_stuck) -> None:
    """Wait until a follower exits; if rank 0 has not closed its shards (`closed()`) within
    `grace_s` after that, call `on_stuck(description)`: rank 0 is blocked in a collective that will
    never complete (or idle, and could only find out at its next step). Returns once closed."""
    from multiprocessing.connection import wait
    sentinels = {p.sentinel: p for p in processes}
    while not closed():
        if wait(list(sentinels), timeout=1.0):
            break
    else:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if closed():
            return
        time.sleep(0.05)
    on_stuck(", ".join(f"{p.name} exited ({p.exitcode})" for p in processes if p.exitcode is not None))


def _exit_stuck(description: str) -> None:
    """The engine process cannot go on and cannot raise out of a CUDA wait: end it, so the server
    ends its streams UNAVAILABLE and starts a new engine, as for any engine death."""
    log.critical("tp_rank_lost", detail=description, action="engine process exits")
    os._exit(70)


# ---- ranks 1..N-1 --------------------------------------------------------------------------------
@dataclass
class Follower:
    """A follower's state: its runner and K/V storage, and the tensors rank 0 refers to by id."""
    runner: object
    kv: object
    device: torch.device
    prefix_cache: object = None                       # engine.prefix_cache.PrefixCache of this rank's heads

    def __post_init__(self) -> None:
        self.prefilled = None                         # the last Prefill's result
        self.parked: dict[str, torch.Tensor] = {}     # host copies of parked rows
        self.partial: dict[str, torch.Tensor] = {}    # prompts being prefilled in chunks

    @torch.inference_mode()
    def apply(self, message) -> None:
        kind, kv = type(message), self.kv
        if kind is not Embed and kind is not Drop and kind is not CacheInsert:
            # A prefill group's Embeds (and Drops of rows it finished, and the prefix cache's
            # copies of its prompts) follow its Prefill: its K/V are dropped at the next other
            # operation, as rank 0 drops them after the group.
            self.prefilled = None
        if kind is Decode:
            if message.on_device:
                ids = share_ids(torch.empty(kv.num_rows, dtype=torch.long, device=self.device))
            else:
                ids = message.input_ids
            self.runner.decode(ids)
        elif kind is Prefill:
            self.prefilled = self.runner.prefill(message.prompts)
        elif kind is PackedPrefill:
            if self.prefix_cache is not None:   # CacheLoads' copies into these chunks' partial K/V
                self.prefix_cache.ready([row_id for row_id, _n, _ids, _start in message.chunks])
            chunks = [(self._partial(row_id, prompt_len), ids, start)
                      for row_id, prompt_len, ids, start in message.chunks]
            self.runner.packed.prefill(message.prompts, message.row_ids, chunks)
            self.prefilled = _PackedRows(kv, message.row_ids)
        elif kind is Embed:
            kv.add_row(message.row_id, self.prefilled.row_kv(message.index))
        elif kind is Reserve:
            kv.reserve(message.longest)
        elif kind is Park:
            self.parked[message.row_id] = kv.take_row(message.row_id, _host_empty)
        elif kind is Restore:
            kv.add_row(message.row_id, self.parked.pop(message.row_id).to(self.device))
        elif kind is Drop:
            self._drop_partial(message.row_id)
            self.parked.pop(message.row_id, None)
            if message.row_id in kv.row_ids:
                kv.remove_row(message.row_id)
        elif kind is Chunk:
            if self.prefix_cache is not None:
                self.prefix_cache.ready([message.row_id])
            self.runner.prefill_chunk(self._partial(message.row_id, message.prompt_len), message.ids, message.start)
        elif kind is CacheLoad:
            partial = self.partial[message.row_id] = self.runner.new_partial_kv(len(message.prompt_ids))
            self.prefix_cache.load(message.prompt_ids, partial[:, :, 0], message.row_id)
        elif kind is CacheInsert:
            if message.row_id:
                source = kv.row_kv(message.row_id)
            elif message.partial:
                source = self.partial[message.partial][:, :, 0]
            else:
                source = self.prefilled.row_kv(message.index)
            self.prefix_cache.insert(message.token_ids, source)
        elif kind is EmbedChunked:
            partial = self.partial[message.source] if message.source else self.partial[message.row_id]
            kv.reserve(message.length)
            kv.add_row(message.row_id, partial[:, :, 0, :, :message.length])
            if not message.source:
                self._drop_partial(message.row_id)
        else:
            raise TypeError(f"unknown tensor-parallel message {message!r}")

    def _drop_partial(self, row_id: str) -> None:
        if self.prefix_cache is not None:
            self.prefix_cache.forget(row_id)   # a load still pending: never brought up (as on rank 0)
        partial = self.partial.pop(row_id, None)
        if partial is not None:
            self.runner.release_partial(partial)

    def _partial(self, row_id: str, prompt_len: int) -> torch.Tensor:
        """The partial K/V of a prompt prefilled in chunks (made at its first chunk, or by CacheLoad)."""
        partial = self.partial.get(row_id)
        if partial is None:
            partial = self.partial[row_id] = self.runner.new_partial_kv(prompt_len)
        return partial


@dataclass
class _PackedRows:
    """A PackedPrefill's prompts, as an Embed reads them: prompt i is row row_ids[i]'s K/V."""
    kv: object
    row_ids: list[str]

    def row_kv(self, index: int) -> torch.Tensor:
        return self.kv.row_kv(self.row_ids[index])


def _host_empty(shape, dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


def follow(conn, rank: int, world: int, port: int, config, loader, setup=None) -> None:
    """Entry point of follower `rank`: join the group, load and shard the model, build the K/V
    storage rank 0 describes, then run rank 0's operations until Stop or its pipe closes."""
    prepare_child(setup)   # rank 0's process decides when we stop
    from engine import model_loader
    from engine.build import runner_options
    from engine.kv_paged import PagedKV
    from engine.kv_slab import KVSlab
    from engine.model_runner import ModelRunner
    try:
        import torch.distributed as dist
        device = rank_device(model_loader.resolve_device(config.device), rank)
        store = dist.TCPStore("127.0.0.1", port, world, is_master=False)
        store.set(f"up/{rank}", "1")
        mesh = _join_group(rank, world, store, device)
        if loader is None:
            hf_model, _tokenizer, _spec = model_loader.load(config.model, device,
                                                            model_loader.resolve_dtype(config.dtype, device))
        else:
            hf_model, _tokenizer, _spec = loader()
        store.set(f"loaded/{rank}", "1")
        shard_model(hf_model, mesh, config.tp_allreduce, config.max_batch_size, config.tp_vocab_parallel)
        geometry = _decode(conn.recv_bytes())
        dtype = hf_model.dtype
        if geometry.layout == "slab":
            kv = KVSlab(*geometry.dims, geometry.size, geometry.max_seq_len, dtype, device)
        else:
            kv = PagedKV(*geometry.dims, geometry.size, geometry.page_size, geometry.max_seq_len,
                         geometry.max_rows, dtype, device)
        cache = None
        if config.prefix_cache != "off":   # the same sizes as rank 0's: the same slots, evictions, hits
            from engine.prefix_cache import PrefixCache
            cache = PrefixCache(config.prefix_cache, config.kv_page_size, kv.dims, dtype, device,
                                config.prefix_cache_device_bytes, config.prefix_cache_host_bytes,
                                bring_up=config.prefix_cache_bring_up)
        follower = Follower(ModelRunner(hf_model, kv, device, pad_token_id=geometry.pad_token_id,
                                        fused_decode=geometry.fused, packed_prefill=geometry.packed,
                                        cuda_graphs=geometry.graphs, **runner_options(config)),
                          kv, device, cache)
        while type(message := _decode(conn.recv_bytes())) is not Stop:
            follower.apply(message)
    except EOFError:
        pass   # rank 0 is gone
    except BaseException as exc:
        log.critical("tp_follower_died", rank=rank, error=repr(exc), traceback=traceback.format_exc())
        raise
