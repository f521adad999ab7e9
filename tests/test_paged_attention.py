"""Paged decode attention (engine/paged_attention.py) equals SDPA over each row's gathered K/V.

On CPU, fp32. Uncompiled flex evaluates mask_mod on every slot (no block skipping), so it checks the
mask_mod alone; compiled flex (Inductor's C++ template, ~40 s to compile cold on 2 cores, cached
after) checks the block mask: it must visit only the row's pages, so NaN K/V in every page the row
does not hold must not reach its output. The recompile guard is checked with dynamo's eager backend
(same guards and recompiles as Inductor, no C++ compile).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from engine.paged_attention import PagedDecodeAttention

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

D, SCALE = 16, 0.3


def _pools(gen, hkv, num_pages, ps):
    """k_pool, v_pool [Hkv, N, D] random."""
    shape = (hkv, num_pages * ps, D)
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


def _tables(gen, lengths, ps, num_pages, max_pages):
    """Disjoint, shuffled, non-contiguous pages per row -> page_table [rows, max_pages] int32 whose
    unused entries are page 0 (a valid page id, possibly another row's)."""
    perm = torch.randperm(num_pages, generator=gen).tolist()
    table = torch.zeros(len(lengths), max_pages, dtype=torch.int32)
    for r, n in enumerate(lengths):
        held = -(-n // ps)
        table[r, :held] = torch.tensor(perm[:held], dtype=torch.int32)
        perm = perm[held:]
    return table, torch.tensor(lengths, dtype=torch.int32)


def _reference(q, k_pool, v_pool, table, lengths, ps):
    """SDPA over each row's gathered K/V: slots of its pages in logical order, first lengths[r]."""
    out = torch.zeros_like(q)
    for r, n in enumerate(lengths.tolist()):
        if n == 0:
            continue
        slots = (table[r].long()[:, None] * ps + torch.arange(ps)).flatten()[:n]
        out[r:r + 1] = F.scaled_dot_product_attention(
            q[r:r + 1], k_pool[None, :, slots], v_pool[None, :, slots], scale=SCALE, enable_gqa=True)
    return out


def _make(hq, hkv, ps, num_pages, max_rows, max_pages, compile=False):
    return PagedDecodeAttention(hq, hkv, D, ps, max_rows, max_pages, "cpu", compile, num_pages=num_pages)


@pytest.mark.parametrize("hq,hkv", [(4, 2), (4, 4)])
@pytest.mark.parametrize("ps", [16, 128])
def test_eager_matches_gathered_sdpa(hq, hkv, ps):
    gen = torch.Generator().manual_seed(ps + hq + hkv)
    num_pages, max_pages = 24, 5
    lengths = [1, ps, 2 * ps + 3, 5 * ps, ps - 1, 3 * ps + 1]    # length 1, page boundaries, partial
    table, lens = _tables(gen, lengths, ps, num_pages, max_pages)
    k, v = _pools(gen, hkv, num_pages, ps)
    att = _make(hq, hkv, ps, num_pages, max_rows=8, max_pages=max_pages)
    att.update(table, lens, rows=len(lengths))
    q = torch.randn(len(lengths), hq, 1, D, generator=gen)
    out = att(q, k, v, rows=len(lengths), scale=SCALE)
    assert out.shape == q.shape
    torch.testing.assert_close(out, _reference(q, k, v, table, lens, ps), rtol=1e-5, atol=1e-5)


def test_block_mask_visits_only_the_rows_pages():
    """Full pages in full_kv_*, the partial last page (if any) in kv_*; together exactly the pages
    the row holds, in logical order."""
    gen = torch.Generator().manual_seed(1)
    ps, num_pages, max_pages = 16, 20, 4
    lengths = [1, 16, 35, 64, 0]
    table, lens = _tables(gen, lengths, ps, num_pages, max_pages)
    att = _make(4, 2, ps, num_pages, max_rows=6, max_pages=max_pages)
    att.update(table, lens, rows=len(lengths))
    for r, n in enumerate(lengths + [0]):       # row 5: beyond `rows`, empty
        full, partial = n // ps, int(n % ps != 0)
        assert att.full_kv_num_blocks[r, 0, 0] == full and att.kv_num_blocks[r, 0, 0] == partial
        visited = att.full_kv_indices[r, 0, 0, :full].tolist() + att.kv_indices[r, 0, 0, :partial].tolist()
        assert visited == (table[r, :full + partial].tolist() if r < len(lengths) else [])
        p2l = att.physical_to_logical[r, :num_pages]
        if r < len(lengths):
            assert sorted((p2l >= 0).nonzero().flatten().tolist()) == sorted(visited)
            assert [p2l[p].item() for p in visited] == list(range(len(visited)))


def test_update_rewrites_static_buffers():
    """The same instance and BlockMask follow update(): new tables change the result, and rows
    past update's `rows` become empty (zeros) for a call with a larger bucket."""
    gen = torch.Generator().manual_seed(2)
    ps, num_pages, max_pages, hq, hkv = 16, 24, 4, 4, 2
    k, v = _pools(gen, hkv, num_pages, ps)
    att = _make(hq, hkv, ps, num_pages, max_rows=4, max_pages=max_pages)
    buffers = [att.page_table.data_ptr(), att.kv_indices.data_ptr(), att.physical_to_logical.data_ptr()]
    q = torch.randn(4, hq, 1, D, generator=gen)
    for lengths in ([5, 40, 16, 64], [33, 1, 48, 7], [17, 2]):
        table, lens = _tables(gen, lengths, ps, num_pages, max_pages)
        att.update(table, lens, rows=len(lengths))
        out = att(q, k, v, rows=4, scale=SCALE)
        padded = torch.cat([lens, torch.zeros(4 - len(lengths), dtype=torch.int32)])
        table = torch.cat([table, torch.zeros(4 - len(lengths), max_pages, dtype=torch.int32)])
        torch.testing.assert_close(out, _reference(q, k, v, table, padded, ps), rtol=1e-5, atol=1e-5)
    assert len(att._block_masks) == 1
    assert buffers == [att.page_table.data_ptr(), att.kv_indices.data_ptr(), att.physical_to_logical.data_ptr()]


def test_pool_of_2_pow_31_elements_is_refused():
    with pytest.raises(ValueError, match="2\\*\\*31"):
        PagedDecodeAttention(32, 32, 128, 128, 4, 4, "meta", False, num_pages=4096)
    PagedDecodeAttention(32, 32, 128, 128, 4, 4, "meta", False, num_pages=4095)


def test_bad_shapes_are_refused():
    att = _make(4, 2, 16, 8, max_rows=4, max_pages=2)
    k, v = torch.zeros(2, 128, D), torch.zeros(2, 128, D)
    with pytest.raises(ValueError, match="q shape"):
        att(torch.zeros(3, 4, 1, D), k, v, rows=2, scale=SCALE)
    with pytest.raises(ValueError, match="k_pool shape"):
        att(torch.zeros(2, 4, 1, D), torch.zeros(2, 64, D), v, rows=2, scale=SCALE)
    with pytest.raises(ValueError, match="max_pages_per_row"):
        att.update(torch.zeros(2, 3, dtype=torch.int32), torch.ones(2, dtype=torch.int32), rows=2)


def test_compiled_skips_pages_the_row_does_not_hold():
    """Compiled flex (C++ on CPU) is exact and reads only the row's pages: K/V of every other page
    is NaN. The stale tail of a row's last page is read (and masked), so it must stay finite."""
    gen = torch.Generator().manual_seed(3)
    ps, num_pages, max_pages, hq, hkv = 16, 16, 4, 4, 2
    lengths = [1, 16, 35, 49, 0]
    table, lens = _tables(gen, lengths, ps, num_pages, max_pages)
    k, v = _pools(gen, hkv, num_pages, ps)
    held = torch.zeros(num_pages, dtype=torch.bool)
    for r, n in enumerate(lengths):
        held[table[r, :-(-n // ps)].long()] = True
    k.view(hkv, num_pages, ps, D)[:, ~held] = float("nan")
    v.view(hkv, num_pages, ps, D)[:, ~held] = float("nan")
    att = _make(hq, hkv, ps, num_pages, max_rows=5, max_pages=max_pages, compile=True)
    att.update(table, lens, rows=5)
    q = torch.randn(5, hq, 1, D, generator=gen)
    out = att(q, k, v, rows=5, scale=SCALE)
    torch.testing.assert_close(out, _reference(q, k, v, table, lens, ps), rtol=1e-5, atol=1e-5)


def test_compiled_row_buckets_past_the_default_recompile_limit():
    """Ten row buckets (> dynamo's default limit of 8) each compile once and stay compiled; new
    tables or another layer's pools reuse the compiled code (no recompile); an unexpected recompile
    past the limit raises instead of silently running uncompiled. dynamo's own config.patch, not
    pytest's monkeypatch: monkeypatch's undo deletes the setting (dynamo then hides it, and every
    later flex_attention call in the process fails)."""
    config = torch._dynamo.config
    with config.patch(recompile_limit=8, fail_on_recompile_limit_hit=False):
        _row_buckets_compile_once(config)


def _row_buckets_compile_once(config) -> None:
    torch.compiler.reset()
    gen = torch.Generator().manual_seed(4)
    ps, num_pages, max_pages, hq, hkv = 16, 16, 4, 4, 2
    att = _make(hq, hkv, ps, num_pages, max_rows=10, max_pages=max_pages)
    att.compiled = True
    att._flex = torch.compile(flex_attention, dynamic=False, fullgraph=True, backend="eager")
    pools = [_pools(gen, hkv, num_pages, ps) for _ in range(2)]
    for rows in range(1, 11):
        table, lens = _tables(gen, [5 * rows + 1] * rows if rows < 4 else [9] * rows, ps, num_pages, max_pages)
        att.update(table, lens, rows=rows)
        q = torch.randn(rows, hq, 1, D, generator=gen)
        out = att(q, *pools[0], rows=rows, scale=SCALE)
        torch.testing.assert_close(out, _reference(q, *pools[0], table, lens, ps), rtol=1e-5, atol=1e-5)
    assert config.fail_on_recompile_limit_hit and config.recompile_limit >= 10
    with torch._dynamo.config.patch(error_on_recompile=True):
        table, lens = _tables(gen, [3, 40, 17], ps, num_pages, max_pages)
        att.update(table, lens, rows=3)
        q = torch.randn(3, hq, 1, D, generator=gen)
        for k, v in pools:   # new tables, another layer's pools: same compiled code
            torch.testing.assert_close(att(q, k, v, rows=3, scale=SCALE),
                                       _reference(q, k, v, table, lens, ps), rtol=1e-5, atol=1e-5)
    config.recompile_limit = 1
    with pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit):   # a new dtype: one too many
        att._flex(q.double(), pools[0][0][None].double(), pools[0][1][None].double(),
                  block_mask=att._block_mask(3), scale=SCALE, enable_gqa=True)


def test_decode_kernel_options_from_the_engine_settings():
    """EngineConfig's decode-kernel settings become flex's kernel_options (0: flex's own choice),
    and a K/V block that does not divide the page (the mask's block) is left to flex."""
    from engine.config import EngineConfig
    from engine.paged_decode import decode_kernel_options
    c = EngineConfig()
    assert decode_kernel_options(c.decode_split_kv, c.decode_num_stages, c.decode_kv_block, 128) == \
        {"num_stages": 2, "BLOCK_N": 128}
    assert decode_kernel_options(0, 2, 128, 64) == {"num_stages": 2}
    assert decode_kernel_options(4, 0, 64, 128) == {"SPLIT_KV": 4, "BLOCK_N": 64}
    assert decode_kernel_options(0, 0, 0, 128) is None
