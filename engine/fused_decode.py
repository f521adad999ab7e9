"""A decode step for Llama-family models with fewer, fused kernels (the CUDA fast path).

The Hugging Face forward of one Llama layer at decode time launches about 50 kernels; at batch
32 the GEMMs and the attention read the bytes that matter, but a profile on an H200 showed
2.7 ms of a 12 ms step in tiny element-wise kernels (RMSNorm alone is 7 kernels) and cuBLAS split-K
GEMMs for q, k and v that each reach only 60% of the copy bandwidth. This module runs the same
arithmetic on the same weights with:
  - q/k/v as one GEMM and gate/up as one GEMM (the HF modules' weights become views into the
    concatenated tensors, so no extra memory and prefill keeps using the HF modules);
  - RMSNorm as one row-wise kernel (on CUDA liger-kernel's, with the add where a residual is not
    added inside a GEMM; elsewhere PyTorch's, its scale inside it), and each residual add inside
    the o and down GEMMs (addmm_ in place, beta 1; not under tensor parallelism, where the residual is added
    after the all-reduce): `fuse_epilogues`; the q/k/v split with the rotary embedding, and
    SiLU(gate) * up, each compiled by torch.compile into one or two kernels (`compile=True`).
    Only point-wise work is compiled: its per-element result does not depend on the kernel
    configuration Inductor tunes per batch size, so bucketing rows cannot change the tokens;
  - the new K and V written into the slab with an index_copy_ each; grouped-query attention
    reads each K/V head once (query heads of a group as query rows), never a repeated copy.
Outputs follow HF's op order (fp32 RMSNorm, rotate-half rotary, SDPA with the regenerated mask),
so in fp32 the tokens equal HF generate's (tests/test_fused_decode.py); in bf16 the compiled
kernels round differently from eager PyTorch, as any fused kernel does.

Supported: LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM checkpoints with SiLU MLPs
(any rotary variant HF implements: cos/sin come from the model's own rotary module). Anything
else falls back to the HF forward (`unsupported_reason` says why).
"""
from __future__ import annotations

import structlog
import torch
import torch.fx.experimental._config as fx_config
import torch.nn.functional as F

from engine.rope_store import rope_store as rope_store_kernel

log = structlog.get_logger("baton.engine")

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")


def unsupported_reason(model) -> str | None:
    config = model.config
    if getattr(config, "model_type", None) not in SUPPORTED_TYPES:
        return f"model_type {getattr(config, 'model_type', None)!r} is not one of {SUPPORTED_TYPES}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r}"
    if getattr(config, "mlp_bias", False):
        return "mlp_bias"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return "unexpected module layout"
    attn = inner.layers[0].self_attn
    if not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return "unexpected attention layout"
    return None


# ---- the element-wise pieces ---------------------------------------------------------------------
def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm (normalise in fp32, round to the input dtype, then scale) with PyTorch's one
    row-wise kernel for the normalisation. Not compiled: a compiled reduction's block size is tuned
    per batch size, so padding rows to a bucket could change the summation order and the tokens."""
    return weight * F.rms_norm(x, (x.shape[-1],), eps=eps)


def _rms_norm_scaled(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The same RMSNorm with the scale inside PyTorch's row-wise kernel: one kernel instead of two.
    Equal in fp32; in bf16 the normalised value is not rounded before the scale (one rounding, not
    two), as any fused kernel rounds."""
    return F.rms_norm(x, (x.shape[-1],), weight=weight, eps=eps)


def _liger():
    """-> liger-kernel's functional module, or None where it cannot run (no CUDA, no liger-kernel)."""
    if not torch.cuda.is_available():
        return None
    try:
        from liger_kernel.transformers import functional
    except Exception as exc:  # noqa: BLE001 - any import failure: PyTorch's kernels instead
        log.warning("liger_kernel_unavailable", error=repr(exc)[:300])
        return None
    return functional


def liger_add_norm():
    """-> add_norm(y, x, weight, eps) -> (x + y, RMSNorm(x + y) * weight) in one Triton kernel
    (Liger-Kernel's fused add + RMSNorm: one program per row, its block the whole row, so a row's
    result does not depend on the batch's size), or None where it cannot run. HF's roundings: the
    sum rounded to the dtype (the residual), the normalised value rounded before the scale."""
    liger = _liger()
    if liger is None:
        return None

    def add_norm(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float):
        h, total = liger.liger_fused_add_rms_norm(y, x, weight, eps, 0.0, "llama", False)
        return total, h
    return add_norm


def liger_norm():
    """-> norm(x, weight, eps) -> RMSNorm(x) * weight, the same kernel's arithmetic without the add
    (Liger-Kernel's RMSNorm), or None where it cannot run. PyTorch's row-wise kernel took ~6 us a
    7B norm at 32 rows on an H200, 0.39 ms a step (note 32); liger's ~2 us."""
    liger = _liger()
    if liger is None:
        return None

    def norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return liger.liger_rms_norm(x, weight, eps, 0.0, "llama", False)
    return norm


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _qkv_split_rotary(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, hq: int, hkv: int, d: int):
    """[B, (hq + 2 hkv) d] -> q [B, hq, 1, d] and k, v [B, hkv, 1, d], rotary applied to q and k."""
    b = qkv.shape[0]
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    c, s = cos[:, None, :], sin[:, None, :]                                  # [B, 1, d]
    q = _rotary(q.view(b, hq, d), c, s)
    k = _rotary(k.view(b, hkv, d), c, s)
    return q[:, :, None], k[:, :, None], v.reshape(b, hkv, 1, d)


def _silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class _Layer:
    __slots__ = ("ln1", "ln2", "eps1", "eps2", "qkv_w", "qkv_b", "o_w", "o_b", "gate_up_w", "down_w")


def _fuse_rows(modules: list[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate Linear weights along the output dim and make each module's weight a view of the
    result (one copy in memory, shared with the HF modules that prefill uses)."""
    weight = torch.cat([m.weight.detach() for m in modules], dim=0)
    rows = [m.weight.shape[0] for m in modules]   # not out_features: a tensor-parallel shard has fewer
    bias = None
    if any(m.bias is not None for m in modules):
        bias = torch.cat([m.bias.detach() if m.bias is not None else
                          torch.zeros(n, dtype=weight.dtype, device=weight.device) for m, n in zip(modules, rows)])
    start = 0
    for m, n in zip(modules, rows):
        m.weight = torch.nn.Parameter(weight[start:start + n], requires_grad=False)
        if bias is not None and m.bias is not None:
            m.bias = torch.nn.Parameter(bias[start:start + n], requires_grad=False)
        start += n
    return weight, bias


class FusedDecoder:
    """decode(ids, positions, mask, data, rows, lo, hi, write_index) -> logits [B, V], reading and
    writing the slab `data` [L, 2, S, H, T, D] like kv_slab.SlabCache does for the HF forward."""

    def __init__(self, model, compile: bool = False, fuse_epilogues: bool = True,
                 add_norm: bool | None = None, rope_store: bool | None = None) -> None:
        """`fuse_epilogues`: each RMSNorm's scale inside its kernel, and (without tensor parallelism
        and without an o bias) each residual add inside the o and down GEMMs (addmm_, beta 1): four
        kernels a layer fewer and one for the final norm (two a layer under tensor parallelism),
        each a launch and a gap in the step (note 27). `add_norm`: where a residual add is not
        inside a GEMM, it and the RMSNorm after it run as one kernel (`liger_add_norm`; on CUDA
        where liger-kernel imports), and every other RMSNorm runs as liger's (`liger_norm`); None =
        on CUDA (note 30: at 70B the step's 160 RMSNorms and 160 adds took 1.8 ms of 27, ~1,560
        kernels a step; note 32: PyTorch's norm ~6 us, liger's ~2). `rope_store`:
        on pages, each layer's rotary embedding and K/V write as one kernel instead of four
        (engine/rope_store.py); None = on CUDA where Triton runs, True = wherever it runs."""
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"fused decode does not support this model: {reason}")
        inner = model.model
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.final_norm = inner.norm
        self.lm_head = model.lm_head
        attn0 = inner.layers[0].self_attn
        self.head_dim = attn0.head_dim
        # Heads from the weights, not the config: under tensor parallelism they are this rank's.
        self.num_heads = attn0.q_proj.weight.shape[0] // self.head_dim
        self.num_kv_heads = attn0.k_proj.weight.shape[0] // self.head_dim
        self.scaling = attn0.scaling
        # Tensor parallelism (engine/tensor_parallel.py): o and down are row-parallel, so their
        # partial outputs are summed over the ranks (the same two all-reduces as the HF forward).
        shards = getattr(model, "_baton_tp", None)
        if shards is not None and shards.rowwise_bias:
            raise ValueError("fused decode does not support this model: a row-parallel linear with a bias")
        self.reduce = shards.all_reduce if shards is not None else (lambda x: x)
        # tp_allreduce "fused": the sum over the ranks, the add and the norm as one kernel (engine/allreduce_norm.py)
        self.reduce_add_norm = shards.all_reduce_add_norm if shards is not None else None
        # the LM head's rows split over the ranks, the logits gathered (tensor_parallel.vocab_parallel_head)
        self.head_part, self.gather_vocab = (shards.vocab_gather if shards is not None and shards.vocab_gather
                                             else (None, None))
        # under TP the residual is added after the all-reduce of the partial sums
        self.residual_in_gemm = fuse_epilogues and shards is None
        on_cuda = next(model.parameters()).is_cuda
        if add_norm is None:
            add_norm = on_cuda
        self.add_norm = liger_add_norm() if add_norm and on_cuda else None
        self.norm = (liger_norm() if self.add_norm is not None else None) or \
            (_rms_norm_scaled if fuse_epilogues else _rms_norm)
        self.rope_store = rope_store_kernel() if rope_store or (rope_store is None and on_cuda) else None
        self.layers: list[_Layer] = []
        with torch.no_grad():
            for block in inner.layers:
                a, mlp = block.self_attn, block.mlp
                layer = _Layer()
                layer.ln1, layer.eps1 = block.input_layernorm.weight, block.input_layernorm.variance_epsilon
                layer.ln2, layer.eps2 = block.post_attention_layernorm.weight, block.post_attention_layernorm.variance_epsilon
                layer.qkv_w, layer.qkv_b = _fuse_rows([a.q_proj, a.k_proj, a.v_proj])
                layer.o_w, layer.o_b = a.o_proj.weight, a.o_proj.bias
                layer.gate_up_w, _ = _fuse_rows([mlp.gate_proj, mlp.up_proj])
                layer.down_w = mlp.down_proj.weight
                self.layers.append(layer)
        self.qkv_rotary, self.silu_mul = _qkv_split_rotary, _silu_mul
        self.compiled = False
        if compile:
            self._compile()

    def _compile(self) -> None:
        """Compile the point-wise pieces (dynamic shapes: one compile serves every bucket) and run
        them once now, so a machine where compiling fails (no C compiler for Triton, say) falls
        back to the same functions uncompiled instead of failing a request or a graph capture."""
        # Compiled code is cached per function across every FusedDecoder in the process, and past
        # the recompile limit (8: dtypes x shape specialisations of earlier engines) dynamo runs the
        # function uncompiled without saying so, which rounds bf16 differently from the compiled
        # path. A serving process builds one engine; start each one from an empty cache.
        torch.compiler.reset()
        opts = dict(dynamic=True, fullgraph=True)
        qkv_rotary = torch.compile(_qkv_split_rotary, **opts)
        silu_mul = torch.compile(_silu_mul, **opts)
        # Every later call must find its compiled code here, never recompile mid-run (a recompile
        # costs seconds: a stall of every stream, docs/benchmarks.md note 25). So the warm-up
        #  - runs under inference_mode, as every step and prefill does (an inference tensor fails a
        #    guard on tensors made outside it), and outside it, as the slab's CUDA-graph capture does;
        #  - covers 1 token (dynamo specialises sizes 0 and 1) and then the dynamic code, traced at
        #    2 and 3;
        #  - turns off duck shaping: sizes equal at trace time are otherwise taken for one symbol
        #    (2 tokens == 2 kv heads), a guard that the next other size fails.
        try:
            for inference in (False, True):   # the last traced is the first dynamo checks: real calls
                with torch.inference_mode(inference), fx_config.patch(use_duck_shape=False):
                    self._warm_up(qkv_rotary, silu_mul)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: run uncompiled
            log.warning("fused_decode_compile_failed", error=repr(exc)[:500])
            return
        self.qkv_rotary, self.silu_mul = qkv_rotary, silu_mul
        self.compiled = True

    def _warm_up(self, qkv_rotary, silu_mul) -> None:
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        w = self.layers[0].qkv_w
        for rows in (1, 2, 3):
            qkv = torch.zeros(rows, w.shape[0], dtype=w.dtype, device=w.device)
            cos = torch.ones(rows, d, dtype=w.dtype, device=w.device)
            qkv_rotary(qkv, cos, cos.clone(), hq, hkv, d)   # two tensors, as in real calls
            silu_mul(torch.zeros(rows, self.layers[0].gate_up_w.shape[0], dtype=w.dtype, device=w.device))

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, attend,
                 keep: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, 1], positions [B, 1] -> logits [B, V]. `attend(layer, q, k, v)` stores the
        new k, v [B, hkv, 1, d] and returns the attention of q [B, hq, 1, d] as [B, hq * d]
        (`SlabAttend`, `PagedAttend`, or fused_prefill's `PackedAttend`, whose B tokens are whole
        prompts packed end to end). `keep`: only these tokens' logits ([len(keep), V])."""
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        x = self.embed(input_ids[:, 0])                                     # [B, hidden]
        cos, sin = self.rotary(x, positions)                                # [B, 1, d] each
        cos, sin = cos[:, 0], sin[:, 0]
        norm, fold, layers = self.norm, self.residual_in_gemm, self.layers
        final = (self.final_norm.weight, self.final_norm.variance_epsilon)
        h = norm(x, layers[0].ln1, layers[0].eps1)
        store = self.rope_store if isinstance(attend, PagedAttend) else None
        for i, layer in enumerate(layers):
            qkv = F.linear(h, layer.qkv_w, layer.qkv_b)
            if store is not None:   # rotary and the K/V write into the pool in one kernel
                a = attend.written(i, store(qkv, cos, sin, attend.data[i], attend.write_slots, hq, hkv, d))
            else:
                q, k, v = self.qkv_rotary(qkv, cos, sin, hq, hkv, d)
                a = attend(i, q, k, v)
            if fold and layer.o_b is None:
                # x + a @ o^T, one kernel, in place: out of place PyTorch first copies x into the
                # result (one more kernel a GEMM; pytorch/pytorch#153590); x is this step's own
                x = x.addmm_(a, layer.o_w.t())
                h = norm(x, layer.ln2, layer.eps2)
            else:
                x, h = self._reduce_add_norm(F.linear(a, layer.o_w, layer.o_b), x, layer.ln2, layer.eps2)
            m = self.silu_mul(F.linear(h, layer.gate_up_w))
            # the next norm: the next layer's first, or the final one (row-wise: kept rows are selected after)
            weight, eps = (layers[i + 1].ln1, layers[i + 1].eps1) if i + 1 < len(layers) else final
            if fold:
                x = x.addmm_(m, layer.down_w.t())
                h = norm(x, weight, eps)
            else:
                x, h = self._reduce_add_norm(F.linear(m, layer.down_w), x, weight, eps)
        if keep is not None:
            h = h.index_select(0, keep)
        if self.head_part is not None:
            return self.gather_vocab(F.linear(h, self.head_part))
        return self.lm_head(h)

    def _reduce_add_norm(self, y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float):
        """-> (x + the sum of y over the ranks, the RMSNorm of it): one kernel where tp_allreduce is
        "fused" and it serves these rows, else the all-reduce, then `_add_norm`."""
        if self.reduce_add_norm is not None:
            out = self.reduce_add_norm(y, x, weight, eps)
            if out is not None:
                return out
        return self._add_norm(self.reduce(y), x, weight, eps)

    def _add_norm(self, y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float):
        """-> (x + y, the RMSNorm of it): one kernel with `add_norm`, else the add and the norm."""
        if self.add_norm is not None:
            return self.add_norm(y, x, weight, eps)
        x = x + y
        return x, self.norm(x, weight, eps)


class SlabAttend:
    """The slab's attention: the new K/V go to the shared write column of rows [0, rows); each row
    attends the window [lo, hi) under the regenerated mask [B, 1, 1, hi - lo]."""

    def __init__(self, data: torch.Tensor, mask: torch.Tensor, rows: int, lo: int, hi: int,
                 write_index: torch.Tensor, scale: float) -> None:
        self.data, self.mask, self.rows, self.lo, self.hi = data, mask, rows, lo, hi
        self.write_index, self.scale = write_index, scale

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kv = self.data[layer]                                               # [2, S, H, T, D]
        kv[0, :self.rows].index_copy_(2, self.write_index, k)
        kv[1, :self.rows].index_copy_(2, self.write_index, v)
        b, hq, _, d = q.shape
        hkv = k.shape[1]
        # Grouped-query attention without copying K/V: the query heads that share a K/V head attend
        # as query rows of that head (SDPA's enable_gqa with a mask falls back to the slow math
        # kernel on CUDA).
        attn = F.scaled_dot_product_attention(q.view(b, hkv, hq // hkv, d), kv[0, :self.rows, :, self.lo:self.hi],
                                              kv[1, :self.rows, :, self.lo:self.hi], attn_mask=self.mask,
                                              scale=self.scale)
        return attn.reshape(b, hq * d)


class PagedAttend:
    """The paged attention: the new K/V go to each row's own slot of the pool [2, H, N, D]; each row
    attends only its own pages (FlexAttention, engine/paged_attention.py; its tables are updated
    once per step by the caller). With the fused step's `rope_store` the new K/V are in the pool
    already (engine/rope_store.py) and the step calls `written`."""

    def __init__(self, data: torch.Tensor, write_slots: torch.Tensor, attention, rows: int, scale: float) -> None:
        self.data, self.write_slots, self.attention, self.rows, self.scale = data, write_slots, attention, rows, scale

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        pool = self.data[layer]                                             # [2, H, N, D]
        pool[0].index_copy_(1, self.write_slots, k[:, :, 0].transpose(0, 1))   # [H, B, D] at slots [B]
        pool[1].index_copy_(1, self.write_slots, v[:, :, 0].transpose(0, 1))
        return self.written(layer, q)

    def written(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """The attention of q [B, hq, 1, d] once this step's K/V are in the pool."""
        pool = self.data[layer]
        out = self.attention(q, pool[0], pool[1], self.rows, self.scale)   # [B, hq, 1, d]
        return out.reshape(out.shape[0], -1)
