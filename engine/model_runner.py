"""Runs the model: a batched prefill of new requests, and one decode step of the whole batch.

Both forwards go through the Hugging Face model with our own `Cache` (kv_slab.SlabCache), an
explicit 4-D boolean mask and explicit per-row position ids, so any HF causal LM whose attention
honours a 4-D mask works (Llama, Qwen2, Mistral, GPT-2 families). The runner owns tensors; it
knows nothing of requests beyond their token ids.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.kv_slab import KVSlab, SlabCache


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
                 cuda_graphs: bool = False) -> None:
        self.model = hf_model
        self.slab = slab
        self.device = device
        self.pad_token_id = pad_token_id
        self.graphs = None
        if cuda_graphs and device.type == "cuda":
            from engine.cuda_graphs import GraphDecoder
            self.graphs = GraphDecoder(hf_model, slab)
            self.graphs.capture_all()

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
        L, two, _, H, _, D = self.slab.data.shape
        kv = torch.empty(L, two, m, H, P, D, dtype=self.slab.data.dtype, device=self.device)
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=mask[:, None].to(self.device),
            position_ids=positions.to(self.device),
            past_key_values=SlabCache(kv, num_rows=m, lo=0, hi=P, write_index=torch.arange(P, device=self.device)),
            use_cache=True,
            logits_to_keep=1,
        )
        return PrefillResult(logits=out.logits[:, -1], kv=kv, lengths=lengths)

    @torch.inference_mode()
    def decode(self, input_ids: list[int]) -> torch.Tensor:
        """One step for every live row of the slab; row r's input is input_ids[r]. -> logits [n, V]."""
        if self.graphs is not None:
            ids = torch.tensor(input_ids, dtype=torch.long).to(self.device, non_blocking=True)
            return self.graphs.decode(ids)
        slab = self.slab
        n = slab.num_rows
        lo, hi = slab.prepare_decode()
        positions = torch.tensor(slab.lengths, dtype=torch.long, device=self.device)[:, None]  # [n, 1]
        out = self.model(
            input_ids=torch.tensor(input_ids, dtype=torch.long, device=self.device)[:, None],
            attention_mask=slab.decode_mask(lo, hi),                                         # [n,1,1,W]
            position_ids=positions,
            past_key_values=slab.cache(lo),
            use_cache=True,
        )
        slab.advance()
        assert out.logits.shape[0] == n
        return out.logits[:, -1]
