"""Decode attention (q_len 1) over a paged K/V pool, with PyTorch FlexAttention: no padding, no
hand-written kernels.

Job: for `rows` rows of a decode step, attend each row's query to the K/V of its own tokens only,
wherever its pages lie in the pool, and equal SDPA over that row's gathered K/V.

Layout (per layer): k_pool, v_pool [Hkv, N, D] with N = num_pages * page_size; page p holds the
token slots [p * page_size, (p + 1) * page_size). Row r: page_table[r, j] = physical page of its
logical page j; lengths[r] = its valid tokens, including the one written this step, so it attends
logical positions 0 .. lengths[r] - 1 (token t in slot t % page_size of page page_table[r, t // ps]).

How: one BlockMask with KV block = page (flex visits whole blocks, so only the row's pages are read):
  - full_kv_indices / full_kv_num_blocks: the row's full pages (flex skips mask_mod on them);
  - kv_indices / kv_num_blocks: its partial last page (0 or 1 block), where mask_mod hides the
    slots at logical positions >= lengths[r];
  - mask_mod alone is exact too: it maps a physical slot to its logical position through the static
    physical_to_logical table and rejects pages the row does not hold. Uncompiled (eager) flex
    ignores block sparsity and evaluates mask_mod on every slot, so it relies on this.

Invariants:
  - Every tensor the kernel reads (tables, block-mask tensors, lengths) is a static buffer
    allocated once in __init__; update() rewrites them in place on the device (no host sync), and
    each row bucket's BlockMask holds views of them, so a CUDA graph captured once stays valid.
  - One instance serves every layer (the tables are the same for all layers): update() once per
    step, then call it per layer with that layer's pools.
  - A row never holds a physical page twice (pages may be shared between rows); page_table entries
    past a row's pages are any valid page id; lengths[r] <= max_pages_per_row * page_size (not
    checked: it would need a host sync). Rows with lengths 0 (bucket padding) output zeros.
  - Hkv * N * D < 2**31 (asserted).
  - Pool slots must never hold NaN/Inf (allocate pools with zeros, not empty): the stale tail of a
    row's last page is read and masked, and 0 * NaN poisons the row (pages it does not hold are
    never read).
  - compile=False runs flex's eager reference, which scores every slot of the pool: tests only.
Measured (DESIGN-NOTES, H200, torch 2.11): compiled flex failed to compile with a 2**31-element K
tensor; each new shape recompiles and past dynamo's recompile limit runs uncompiled (~50x slower);
paged flex (page 128 = block) took 0.575 ms per layer at batch 128 against 1.907 ms for padded SDPA.
"""
from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

MAX_POOL_ELEMENTS = 2**31      # flex fails to compile when one K tensor has this many elements
Q_BLOCK = 128                  # flex's default query block; q_len 1 fits in one
_RECOMPILE_SLACK = 2           # compiles allowed beyond the expected one per (instance, shape)
_compiled_shapes: set[tuple] = set()   # every (instance, shape) compiled in this process


class PagedDecodeAttention:
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
                 max_rows: int, max_pages_per_row: int, device, compile: bool, *,
                 num_pages: int, kernel_options: dict | None = None) -> None:
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.page_size, self.num_pages = page_size, num_pages
        self.max_rows, self.max_pages_per_row = max_rows, max_pages_per_row
        self.pool_tokens = num_pages * page_size                                  # N
        _check_pool_size(num_kv_heads, self.pool_tokens, head_dim)
        self._alloc(torch.device(device))
        self._mask_mod = self._make_mask_mod()
        self._block_masks: dict[int, BlockMask] = {}
        self._seen_shapes: set[tuple] = set()
        self.compiled = compile
        # flex's decode kernel settings (SPLIT_KV, BLOCK_N, num_warps, num_stages); None: flex's
        # own choice (SPLIT_KV = 2 x SMs // (rows x kv heads), i.e. 1 past 66 row-heads on an H200:
        # one program walks a whole row, so a long row sets the layer's time). Compared by
        # benchmarks/probe_flex_decode.py.
        self.kernel_options = dict(kernel_options) if kernel_options else None
        self._flex = torch.compile(flex_attention, dynamic=False, fullgraph=True) if compile else flex_attention

    def _alloc(self, device: torch.device) -> None:
        i32 = dict(dtype=torch.int32, device=device)
        R, P, NP = self.max_rows, self.max_pages_per_row, self.num_pages
        self.page_table = torch.zeros(R, P, **i32)              # [R, P] physical page of logical page j
        self.lengths = torch.zeros(R, **i32)                    # [R] valid tokens per row
        # [R, NP + 1] logical page of each physical page for row r, -1 if r does not hold it;
        # column NP is a dump column for the unused page_table entries (never read by mask_mod).
        self.physical_to_logical = torch.full((R, NP + 1), -1, **i32)
        # BlockMask tensors [R, 1 head, 1 q block, ...]; indices are NP wide as flex's CPU kernel
        # asserts kv_indices.shape[-1] * page_size >= N (only the first num_blocks are read).
        self.kv_num_blocks = torch.zeros(R, 1, 1, **i32)        # 1 if the last page is partial
        self.kv_indices = torch.zeros(R, 1, 1, NP, **i32)       # [..., 0] = the partial page
        self.full_kv_num_blocks = torch.zeros(R, 1, 1, **i32)   # number of full pages
        self.full_kv_indices = torch.zeros(R, 1, 1, NP, **i32)  # [..., :P] = page_table
        self._logical_ids = torch.arange(P, device=device)      # [P] int64

    def _make_mask_mod(self):
        ps, p2l, lengths = self.page_size, self.physical_to_logical, self.lengths

        def mask_mod(b, h, q_idx, kv_idx):
            logical_page = p2l[b, kv_idx // ps]
            position = logical_page * ps + kv_idx % ps
            return (logical_page >= 0) & (position < lengths[b])

        return mask_mod

    def update(self, page_table: torch.Tensor, lengths: torch.Tensor, rows: int) -> None:
        """page_table [>= rows, <= max_pages_per_row] int, lengths [>= rows] int, on the device.
        Rows >= `rows` become empty (length 0), so a later call with a larger bucket sees padding."""
        if not 0 <= rows <= self.max_rows:
            raise ValueError(f"rows {rows} not in [0, {self.max_rows}]")
        cols = page_table.shape[1]
        if cols > self.max_pages_per_row:
            raise ValueError(f"page_table has {cols} columns > max_pages_per_row {self.max_pages_per_row}")
        self.page_table[:rows, :cols].copy_(page_table[:rows])
        self.page_table[:rows, cols:].zero_()
        self.lengths[:rows].copy_(lengths[:rows])
        self.lengths[rows:].zero_()
        self._refresh_block_mask()
        self._refresh_physical_to_logical(rows)

    def _refresh_block_mask(self) -> None:
        """Derive the BlockMask tensors of all max_rows rows from page_table and lengths, in place."""
        ps, P = self.page_size, self.max_pages_per_row
        lengths = self.lengths.long()                                          # [R]
        full = lengths // ps                                                   # [R] full pages
        self.full_kv_num_blocks[:, 0, 0].copy_(full)
        self.kv_num_blocks[:, 0, 0].copy_(lengths % ps != 0)
        self.full_kv_indices[:, 0, 0, :P].copy_(self.page_table)
        tail = self.page_table.gather(1, full.clamp(max=P - 1)[:, None])       # [R, 1]
        self.kv_indices[:, 0, 0, :1].copy_(tail)

    def _refresh_physical_to_logical(self, rows: int) -> None:
        """physical_to_logical[r, page_table[r, j]] = j for the pages row r holds, -1 elsewhere.
        Rows >= rows keep stale entries: their length 0 masks every slot anyway."""
        ps, P = self.page_size, self.max_pages_per_row
        p2l = self.physical_to_logical[:rows]                                  # [rows, NP + 1]
        p2l.fill_(-1)
        held_pages = (self.lengths[:rows, None].long() + ps - 1) // ps         # [rows, 1]
        held = self._logical_ids[None, :] < held_pages                         # [rows, P]
        dest = torch.where(held, self.page_table[:rows].long(), self.num_pages)
        p2l.scatter_(1, dest, self._logical_ids.to(torch.int32).expand(rows, P))

    def _block_mask(self, rows: int) -> BlockMask:
        """The BlockMask of a row bucket: views of the static buffers, built once per bucket."""
        mask = self._block_masks.get(rows)
        if mask is None:
            mask = BlockMask.from_kv_blocks(
                self.kv_num_blocks[:rows], self.kv_indices[:rows],
                self.full_kv_num_blocks[:rows], self.full_kv_indices[:rows],
                BLOCK_SIZE=(Q_BLOCK, self.page_size), mask_mod=self._mask_mod,
                seq_lengths=(1, self.pool_tokens), compute_q_blocks=False)
            self._block_masks[rows] = mask
        return mask

    def __call__(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, rows: int,
                 scale: float) -> torch.Tensor:
        """q [rows, Hq, 1, D], k_pool/v_pool [Hkv, N, D] -> out [rows, Hq, 1, D]. Reads the tables of
        the last update(); rows must be <= that update's rows for the extra rows to be padding."""
        Hq, Hkv, D, N = self.num_heads, self.num_kv_heads, self.head_dim, self.pool_tokens
        if q.shape != (rows, Hq, 1, D):
            raise ValueError(f"q shape {tuple(q.shape)} != {(rows, Hq, 1, D)}")
        for name, pool in (("k_pool", k_pool), ("v_pool", v_pool)):
            if pool.shape != (Hkv, N, D):
                raise ValueError(f"{name} shape {tuple(pool.shape)} != {(Hkv, N, D)}")
        _check_pool_size(*k_pool.shape)
        if self.compiled:
            self._note_compiled_shape((rows, q.dtype, k_pool.dtype, q.device))
        return self._flex(q, k_pool.unsqueeze(0), v_pool.unsqueeze(0),                # [1, Hkv, N, D]
                          block_mask=self._block_mask(rows), scale=scale, enable_gqa=Hq != Hkv,
                          kernel_options=self.kernel_options)

    def _note_compiled_shape(self, shape: tuple) -> None:
        """Each new shape compiles flex_attention once more (dynamic=False), and every instance and
        caller of torch.compile(flex_attention) share one dynamo cache. Raise the recompile limit
        to the shapes expected so far plus a little slack, and make hitting it an error instead of
        dynamo's silent fallback to uncompiled code (~50x slower)."""
        if shape in self._seen_shapes:
            return
        self._seen_shapes.add(shape)
        _compiled_shapes.add((id(self),) + shape)
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, len(_compiled_shapes) + _RECOMPILE_SLACK)
        config.fail_on_recompile_limit_hit = True


def _check_pool_size(kv_heads: int, tokens: int, head_dim: int) -> None:
    elements = kv_heads * tokens * head_dim
    if elements >= MAX_POOL_ELEMENTS:
        raise ValueError(
            f"K/V pool of {kv_heads} heads x {tokens} slots x {head_dim} = {elements} elements per "
            f"layer reaches 2**31: compiled FlexAttention fails there; use fewer pages per pool")
