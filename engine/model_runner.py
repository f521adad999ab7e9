"""Runs the model: a batched prefill of new requests, and one decode step of the whole batch.

Both forwards go through the Hugging Face model with our own `Cache` (kv_slab.SlabCache), an
explicit 4-D boolean mask and explicit per-row position ids, so any HF causal LM whose attention
honours a 4-D mask works (Llama, Qwen2, Mistral, GPT-2 families). The runner owns tensors; it
knows nothing of requests beyond their token ids.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import structlog
import torch

from engine.config import PREFILL_GRAPH_TOKENS_PER_GPU
from engine.fused_decode import SlabAttend
from engine.kv_paged import PagedCache, PagedKV
from engine.kv_slab import KVSlab, SlabCache

log = structlog.get_logger("baton.engine")
GRAPH_MAX_PADDING = 64   # CUDA: columns of common padding before the window is moved to column 0


@dataclass(frozen=True)
class PrefillResult:
    logits: torch.Tensor      # [m, V] logits of each prompt's last token
    kv: torch.Tensor          # [L, 2, m, H, P, D], prompts right-aligned at column P
    lengths: list[int]        # prompt length of each row

    def row_kv(self, i: int) -> torch.Tensor:
        """[L, 2, H, n, D] K/V of row i, ready to embed."""
        p = self.kv.shape[4]
        return self.kv[:, :, i, :, p - self.lengths[i]:]


class ModelRunner:
    def __init__(self, hf_model, slab: KVSlab, device: torch.device, pad_token_id: int = 0,
                 cuda_graphs: bool = False, fused_decode: bool = False, packed_prefill: bool = True,
                 decode_split_kv: int = 0, decode_num_stages: int = 0,
                 decode_kv_block: int = 0, prefill_graphs: bool = False, max_prefill_tokens: int = 8192,
                 decode_sort_rows: bool = True, fused_epilogues: bool = True, chunk_graphs: bool = True,
                 fused_add_norm: bool | None = None, fused_rope_store: bool | None = None,
                 prefill_graph_tokens: int = PREFILL_GRAPH_TOKENS_PER_GPU) -> None:
        """`packed_prefill`: with the fused step on pages, prefill newcomers through
        engine/fused_prefill.py (`self.packed`) rather than the HF forward. `decode_split_kv`,
        `decode_num_stages`, `decode_kv_block`: the fused paged step's flex SPLIT_KV, num_stages and
        BLOCK_N (0: flex's choice); `decode_sort_rows`: it runs rows longest first;
        `fused_epilogues`, `fused_add_norm`, `fused_rope_store` (its `add_norm`, `rope_store`): see
        FusedDecoder. `prefill_graphs` (with CUDA graphs, on CUDA): that packed prefill's
        whole-prompt forwards of up to `max_prefill_tokens` and `prefill_graph_tokens` tokens
        replay a CUDA graph per token bucket (fused_prefill.StaticPrefill), and with `chunk_graphs` one prompt's chunks at a time too
        (StaticChunk; off under tensor parallelism, where every rank would have to give its one
        workspace to the same prompt)."""
        self.model = hf_model
        self.slab = slab
        self.device = device
        self.pad_token_id = pad_token_id
        # The forward's cache argument: newer transformers renamed `past_key_values` to `cache` (the old
        # name warns a FutureWarning and goes in 5.40); 5.17 knows only `past_key_values`, and passing
        # `cache` there would be swallowed by **kwargs (a fresh DynamicCache, the slab never written).
        self.cache_arg = "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"
        self.fused = None
        paged = isinstance(slab, PagedKV)
        if fused_decode:
            from engine.fused_decode import FusedDecoder
            self.fused = FusedDecoder(hf_model, compile=device.type == "cuda", fuse_epilogues=fused_epilogues,
                                      add_norm=fused_add_norm, rope_store=fused_rope_store)
        self.graphs = None
        self.paged = None     # the fused paged step (FlexAttention over each row's own pages)
        self.packed = None    # prefill straight into pages (engine/fused_prefill.py)
        if paged and self.fused is not None and packed_prefill:
            from engine.fused_prefill import FusedPrefill
            self.packed = FusedPrefill(self.fused, slab, graphs=prefill_graphs and cuda_graphs and device.type == "cuda",
                                       max_tokens=max_prefill_tokens, chunk_graphs=chunk_graphs,
                                       graph_tokens=prefill_graph_tokens)
        if paged and self.fused is not None:
            from engine.paged_decode import PagedDecoder
            on_cuda = device.type == "cuda"
            self.paged = PagedDecoder(self.fused, slab, device, graphs=cuda_graphs and on_cuda, compile=on_cuda,
                                      split_kv=decode_split_kv, sort_rows=decode_sort_rows,
                                      num_stages=decode_num_stages, kv_block=decode_kv_block)
            if self.paged.use_graphs:
                self.paged.capture_all()
        elif cuda_graphs and device.type == "cuda" and not paged:
            from engine.cuda_graphs import GraphDecoder
            self.graphs = GraphDecoder(self.forward_decode, slab, max_padding=GRAPH_MAX_PADDING)
            self.graphs.capture_all()
        if self.packed is not None and self.packed.static is not None:
            try:
                self.packed.static.capture_all()
                if self.packed.chunk_static is not None:
                    self.packed.chunk_static.capture_all()
            except Exception as exc:  # noqa: BLE001 - a capture that fails leaves the eager prefill
                if getattr(hf_model, "_baton_tp", None) is not None:
                    # under TP every rank must take the same path (the graphs hold collectives): a
                    # rank that fell back alone would wait in a collective its peers never join
                    raise RuntimeError(f"prefill graphs failed to capture under tensor parallelism ({exc!r:.300}); "
                                       "start with EngineConfig.prefill_graphs=False") from exc
                log.warning("prefill_graphs_capture_failed", error=repr(exc)[:500])
                self.packed.static = self.packed.chunk_static = None
                torch.cuda.synchronize()

    @property
    def num_graphs(self) -> int:
        graphs = self.graphs if self.graphs is not None else self.paged
        return len(graphs.graphs) if graphs is not None else 0

    @property
    def num_prefill_graphs(self) -> int:
        if self.packed is None or self.packed.static is None:
            return 0
        chunks = self.packed.chunk_static
        return len(self.packed.static.graphs) + (len(chunks.graphs) if chunks is not None else 0)

    def describe(self) -> str:
        """How decode steps run, for the start-up log: e.g. 'fused+compiled, cuda graphs (52)'."""
        kind = "hf" if self.fused is None else "fused+compiled" if self.fused.compiled else "fused"
        if isinstance(self.slab, PagedKV):
            kind += ", paged flex" if self.paged is not None else ", paged gather"
        kind += f", cuda graphs ({self.num_graphs})" if self.num_graphs else ", eager"
        return kind + (f", prefill graphs ({self.num_prefill_graphs})" if self.num_prefill_graphs else "")

    def forward_decode(self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                       rows: int, lo: int, hi: int, write_index: torch.Tensor) -> torch.Tensor:
        """One decode forward of slab rows [0, rows): input_ids and positions [rows, 1], mask
        [rows, 1, 1, hi - lo]; writes column `write_index` and attends columns [lo, hi). -> logits [rows, V]."""
        if self.fused is not None:
            return self.fused(input_ids, positions,
                              SlabAttend(self.slab.data, mask, rows, lo, hi, write_index, self.fused.scaling))
        cache = SlabCache(self.slab.data, num_rows=rows, lo=lo, hi=hi, write_index=write_index)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                         **{self.cache_arg: cache}, use_cache=True)
        return out.logits[:, -1]

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]]) -> PrefillResult:
        """Prefill prompts together, left-padded to the longest; none of the batch's rows take part."""
        # Width rounded up to a multiple of 16: SDPA's memory-efficient kernel needs an aligned mask,
        # and an unaligned one falls back to the math kernel (the extra columns are left padding).
        m, P = len(prompts), -(-max(len(p) for p in prompts) // 16) * 16
        lengths = [len(p) for p in prompts]
        ids = torch.full((m, P), self.pad_token_id, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        first = torch.tensor([P - n for n in lengths])                               # [m]
        cols = torch.arange(P)
        positions = (cols[None, :] - first[:, None]).clamp(min=0)                   # [m, P]
        causal = cols[None, :] <= cols[:, None]                                      # [P, P]
        real = cols[None, :] >= first[:, None]                                       # [m, P] keys
        # Padded queries see only themselves, so no softmax row is empty (no NaN).
        mask = (causal[None] & real[:, None, :]) | torch.eye(P, dtype=torch.bool)[None]  # [m, P, P]
        L, H, D = self.slab.dims
        kv = torch.empty(L, 2, m, H, P, D, dtype=self.slab.data.dtype, device=self.device)
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=mask[:, None].to(self.device),
            position_ids=positions.to(self.device),
            **{self.cache_arg: SlabCache(kv, num_rows=m, lo=0, hi=P, write_index=torch.arange(P, device=self.device))},
            use_cache=True,
            logits_to_keep=1,
        )
        return PrefillResult(logits=out.logits[:, -1], kv=kv, lengths=lengths)

    def new_partial_kv(self, prompt_len: int, workspace: bool = True) -> torch.Tensor:
        """K/V of one prompt prefilled in chunks: [L, 2, 1, H, P, D], P = prompt_len rounded up to
        16 (as `prefill` rounds). Zeroed: columns past the written ones are masked, but a masked
        NaN would still poison the weighted sum. With prefill graphs, the chunk graphs' workspace
        (fused_prefill.StaticChunk) while no other prompt holds it (and `workspace`): finite, never
        NaN. Give it back with `release_partial`."""
        if workspace and self.packed is not None and self.packed.chunk_static is not None:
            held = self.packed.chunk_static.acquire(prompt_len)   # the chunk graphs' workspace, if free
            if held is not None:
                return held
        L, H, D = self.slab.dims
        P = -(-prompt_len // 16) * 16
        return torch.zeros(L, 2, 1, H, P, D, dtype=self.slab.data.dtype, device=self.device)

    def release_partial(self, kv: torch.Tensor) -> None:
        """A partial K/V from `new_partial_kv` is no longer used (its prompt is in pages, or was
        dropped): the chunk graphs' workspace, if it was that, is free for the next prompt."""
        if self.packed is not None and self.packed.chunk_static is not None:
            self.packed.chunk_static.release(kv)

    @torch.inference_mode()
    def prefill_chunk(self, kv: torch.Tensor, ids: list[int], start: int) -> torch.Tensor:
        """Prefill prompt tokens [start, start + len(ids)) of one request into its partial K/V
        (`new_partial_kv`), attending the columns before them and causally among them.
        -> logits [1, V] of the chunk's last token. With the packed prefill: its fused kernels."""
        if self.packed is not None:
            return self.packed.prefill_chunk(kv, ids, start)
        end = start + len(ids)
        width = min(-(-end // 16) * 16, kv.shape[4])       # aligned mask width (see `prefill`)
        cols = torch.arange(width)
        mask = cols[None, :] <= torch.arange(start, end)[:, None]                    # [c, width]
        out = self.model(
            input_ids=torch.tensor([ids], dtype=torch.long, device=self.device),
            attention_mask=mask[None, None].to(self.device),
            position_ids=torch.arange(start, end, device=self.device)[None],
            **{self.cache_arg: SlabCache(kv, num_rows=1, lo=0, hi=width,
                                         write_index=torch.arange(start, end, device=self.device))},
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1]

    @torch.inference_mode()
    def decode(self, input_ids: list[int] | torch.Tensor) -> torch.Tensor:
        """One step for every live row of the slab; row r's input is input_ids[r]: a host list, or
        [n] long on the device (the last step's sampled ids, see LLMEngine._finish_decode). -> logits [n, V]."""
        if isinstance(self.slab, PagedKV):
            return self._decode_paged(input_ids)
        if self.graphs is not None:
            return self.graphs.decode(self._ids(input_ids))
        slab = self.slab
        n = slab.num_rows
        lo, hi = slab.prepare_decode(GRAPH_MAX_PADDING if self.device.type == "cuda" else None)
        positions = torch.tensor(slab.lengths, dtype=torch.long, device=self.device)[:, None]  # [n, 1]
        logits = self.forward_decode(self._ids(input_ids)[:, None],
                                     positions, slab.decode_mask(lo, hi), n, lo, hi,
                                     torch.tensor([slab.write_col], device=self.device))
        slab.advance()
        assert logits.shape[0] == n
        return logits

    def _ids(self, input_ids: list[int] | torch.Tensor) -> torch.Tensor:
        """A step's input ids [n] long on the device."""
        if isinstance(input_ids, torch.Tensor):
            return input_ids
        return torch.tensor(input_ids, dtype=torch.long).to(self.device, non_blocking=True)

    def _decode_paged(self, input_ids: list[int] | torch.Tensor) -> torch.Tensor:
        """The fused paged step (FlexAttention over each row's pages), or the HF forward with each
        row's tokens gathered into a padded window (any model, any device)."""
        if self.paged is not None:
            return self.paged.decode(input_ids)
        kv: PagedKV = self.slab
        write_slots = kv.prepare_decode().to(self.device, non_blocking=True)             # [n]
        gather, mask = kv.gathered_window()                                               # [n, W], [n, 1, 1, W]
        positions = torch.tensor(kv.lengths, dtype=torch.long, device=self.device)[:, None]   # [n, 1]
        out = self.model(input_ids=self._ids(input_ids)[:, None], attention_mask=mask, position_ids=positions,
                         **{self.cache_arg: PagedCache(kv.data, write_slots, gather)}, use_cache=True)
        kv.advance()
        return out.logits[:, -1]
