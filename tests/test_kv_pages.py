"""Page accounting for the paged K/V cache: edge cases, then a state machine that parks, restores,
shares and cancels rows at random and checks after every step that no page leaks or is owned twice."""
from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from engine.kv_pages import OutOfPages, PageAllocator


def ceil_pages(tokens: int, page_size: int) -> int:
    """The model's own rule (the allocator's pages_for must agree with it)."""
    return (tokens + page_size - 1) // page_size


def snapshot(alloc: PageAllocator) -> tuple:
    rows = {r: (alloc.pages(r), alloc.num_tokens(r)) for r in alloc.rows}
    return rows, alloc.num_free, [alloc.refcount(p) for p in range(alloc.num_pages)]


def test_pages_for_is_ceil_division():
    alloc = PageAllocator(num_pages=8, page_size=4)
    assert [alloc.pages_for(n) for n in range(10)] == [0, 1, 1, 1, 1, 2, 2, 2, 2, 3]
    with pytest.raises(ValueError):
        alloc.pages_for(-1)


def test_bad_pool_is_rejected():
    with pytest.raises(ValueError):
        PageAllocator(num_pages=4, page_size=0)
    with pytest.raises(ValueError):
        PageAllocator(num_pages=-1, page_size=4)


def test_exact_boundary_and_lowest_id_first():
    alloc = PageAllocator(num_pages=4, page_size=4)
    assert alloc.allocate("a", 8) == [0, 1]                 # exactly 2 full pages, no spare
    assert alloc.allocate("b", 1) == [2]
    assert alloc.free("a") == [0, 1]
    assert alloc.allocate("c", 5) == [0, 1]                 # lowest ids first, not LIFO
    assert alloc.num_free == 1 and alloc.num_used == 3
    alloc.check()


def test_zero_token_row_holds_no_pages_and_can_grow():
    alloc = PageAllocator(num_pages=2, page_size=4)
    assert alloc.allocate("a", 0) == [] and alloc.rows == ["a"] and alloc.num_free == 2
    assert alloc.grow("a", 1) == [0]
    assert alloc.free("a") == [0]
    assert PageAllocator(num_pages=0, page_size=4).allocate("z", 0) == []


def test_grow_adds_a_page_only_when_crossing_a_boundary():
    alloc = PageAllocator(num_pages=3, page_size=4)
    alloc.allocate("a", 3)
    assert alloc.grow("a", 4) == []                          # fills page 0
    assert alloc.grow("a", 4) == []                          # same count: no-op
    assert alloc.grow("a", 5) == [1]                         # token 4 opens page 1
    assert alloc.grow("a", 12) == [2]
    assert alloc.pages("a") == [0, 1, 2] and alloc.num_tokens("a") == 12
    with pytest.raises(ValueError):
        alloc.grow("a", 11)                                   # no shrinking
    with pytest.raises(KeyError):
        alloc.grow("nobody", 1)
    alloc.check()


def test_out_of_pages_changes_nothing():
    alloc = PageAllocator(num_pages=3, page_size=2)
    alloc.allocate("a", 3)                                    # pages 0, 1
    before = snapshot(alloc)
    assert not alloc.can_allocate("b", 3) and alloc.can_allocate("b", 2)
    with pytest.raises(OutOfPages) as err:
        alloc.allocate("b", 3)
    assert (err.value.needed, err.value.free) == (2, 1)
    assert not alloc.can_allocate("a", 7) and alloc.can_allocate("a", 6)   # counts held pages
    with pytest.raises(OutOfPages):
        alloc.grow("a", 7)                                    # needs 2 more pages, 1 free
    assert snapshot(alloc) == before
    assert alloc.grow("a", 6) == [2]                          # the one that fits still works
    alloc.check()


def test_out_of_pages_on_share_changes_nothing():
    alloc = PageAllocator(num_pages=3, page_size=2)
    alloc.allocate("a", 5)                                    # pages 0, 1, 2: pool full
    before = snapshot(alloc)
    with pytest.raises(OutOfPages):
        alloc.share("a", "b", 3)                              # tail page needs a fresh page
    assert snapshot(alloc) == before
    assert alloc.share("a", "b", 4) == []                     # full pages only: no fresh page
    alloc.check()


def test_duplicate_row_and_bad_share_are_value_errors():
    alloc = PageAllocator(num_pages=4, page_size=2)
    alloc.allocate("a", 3)
    before = snapshot(alloc)
    with pytest.raises(ValueError):
        alloc.allocate("a", 1)
    with pytest.raises(ValueError):
        alloc.share("a", "a", 2)
    with pytest.raises(ValueError):
        alloc.share("a", "b", 4)                              # more tokens than src has
    with pytest.raises(KeyError):
        alloc.share("nobody", "b", 0)
    with pytest.raises(KeyError):
        alloc.free("nobody")
    assert snapshot(alloc) == before


def test_share_full_pages_and_fresh_tail():
    alloc = PageAllocator(num_pages=8, page_size=4)
    alloc.allocate("src", 10)                                 # pages 0, 1, 2 (2 slots in 2)
    assert alloc.share("src", "dst", 10) == [3]               # tail page 2 is not shared
    assert alloc.pages("dst") == [0, 1, 3]
    assert [alloc.refcount(p) for p in range(4)] == [2, 2, 1, 1]
    assert alloc.share("src", "exact", 8) == []               # boundary: both pages shared
    assert alloc.pages("exact") == [0, 1] and alloc.refcount(0) == 3
    assert alloc.grow("exact", 9) == [4]                      # its writes go to its own page
    assert alloc.share("src", "empty", 0) == [] and alloc.pages("empty") == []
    alloc.check()


@pytest.mark.parametrize("first", ["src", "dst"])
def test_share_then_free_in_either_order(first):
    alloc = PageAllocator(num_pages=6, page_size=4)
    alloc.allocate("src", 9)                                  # pages 0, 1, 2
    alloc.share("src", "dst", 9)                              # 0, 1 shared, fresh 3
    second = "dst" if first == "src" else "src"
    own = {"src": [2], "dst": [3]}
    assert alloc.free(first) == own[first]                    # shared pages stay held
    alloc.check()
    assert alloc.refcount(0) == alloc.refcount(1) == 1 and alloc.num_used == 3
    assert sorted(alloc.free(second)) == sorted([0, 1] + own[second])
    assert alloc.num_free == 6 and alloc.rows == []
    alloc.check()


def test_module_does_not_import_torch():
    code = "import sys, engine.kv_pages; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


class PageMachine(RuleBasedStateMachine):
    """Model: live rows -> token count, parked rows -> token count (no pages while parked)."""

    @initialize(num_pages=st.integers(0, 24), page_size=st.integers(1, 5))
    def make_pool(self, num_pages: int, page_size: int) -> None:
        self.alloc = PageAllocator(num_pages, page_size)
        self.live: dict[int, int] = {}
        self.parked: dict[int, int] = {}
        self.next_id = 0

    def _tokens(self) -> st.SearchStrategy[int]:
        return st.integers(0, 4 * self.alloc.page_size + 1)

    def _try(self, action, *args) -> list[int] | None:
        """Runs an allocating call; on OutOfPages checks it was right to fail and changed nothing."""
        before = snapshot(self.alloc)
        try:
            return action(*args)
        except OutOfPages as err:
            assert err.needed > err.free == self.alloc.num_free
            assert snapshot(self.alloc) == before
            return None

    def _held_elsewhere(self, row: int) -> set[int]:
        return {p for r in self.live if r != row for p in self.alloc.pages(r)}

    @rule(data=st.data())
    def add(self, data) -> None:
        row, tokens = self.next_id, data.draw(self._tokens())
        self.next_id += 1
        expect = self.alloc.can_allocate(row, tokens)
        taken = self._try(self.alloc.allocate, row, tokens)
        assert (taken is not None) == expect
        if taken is not None:
            assert len(taken) == ceil_pages(tokens, self.alloc.page_size)
            assert not set(taken) & self._held_elsewhere(row)
            self.live[row] = tokens

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def grow(self, data) -> None:
        row = data.draw(st.sampled_from(sorted(self.live)))
        tokens = self.live[row] + data.draw(st.integers(0, 2 * self.alloc.page_size))
        old = self.alloc.pages(row)
        added = self._try(self.alloc.grow, row, tokens)
        if added is not None:
            assert self.alloc.pages(row) == old + added       # existing pages never move
            assert not set(added) & self._held_elsewhere(row)
            self.live[row] = tokens

    @precondition(lambda self: self.live)
    @rule(data=st.data(), park=st.booleans())
    def remove_or_park(self, data, park: bool) -> None:
        row = data.draw(st.sampled_from(sorted(self.live)))
        held = self.alloc.pages(row)
        released = self.alloc.free(row)
        assert set(released) == set(held) - self._held_elsewhere(row)
        tokens = self.live.pop(row)
        if park:
            self.parked[row] = tokens

    @precondition(lambda self: self.parked)
    @rule(data=st.data())
    def restore(self, data) -> None:
        row = data.draw(st.sampled_from(sorted(self.parked)))
        if self._try(self.alloc.allocate, row, self.parked[row]) is not None:   # any free pages
            self.live[row] = self.parked.pop(row)

    @precondition(lambda self: self.live or self.parked)
    @rule(data=st.data())
    def cancel(self, data) -> None:
        row = data.draw(st.sampled_from(sorted(self.live) + sorted(self.parked)))
        if row in self.parked:
            del self.parked[row]
        else:
            self.alloc.free(row)
            del self.live[row]

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def share(self, data) -> None:
        src = data.draw(st.sampled_from(sorted(self.live)))
        tokens = data.draw(st.integers(0, self.live[src]))
        dst, self.next_id = self.next_id, self.next_id + 1
        fresh = self._try(self.alloc.share, src, dst, tokens)
        if fresh is not None:
            full = tokens // self.alloc.page_size
            assert self.alloc.pages(dst)[:full] == self.alloc.pages(src)[:full]
            assert len(fresh) == ceil_pages(tokens, self.alloc.page_size) - full
            assert not set(fresh) & self._held_elsewhere(dst)
            self.live[dst] = tokens

    @invariant()
    def accounting(self) -> None:
        alloc = self.alloc
        assert sorted(alloc.rows) == sorted(self.live)
        holders = Counter(p for r in self.live for p in alloc.pages(r))
        for page in range(alloc.num_pages):                   # none leaked, none owned twice
            assert alloc.refcount(page) == holders[page]
        assert alloc.num_free + len(holders) == alloc.num_pages == alloc.num_free + alloc.num_used
        for row, tokens in self.live.items():
            assert alloc.num_tokens(row) == tokens
            pages = alloc.pages(row)
            assert len(pages) == ceil_pages(tokens, alloc.page_size) == len(set(pages))
            assert all(holders[p] == 1 for p in pages[tokens // alloc.page_size:])  # tail unshared
        alloc.check()


PageMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=50, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])
TestPageMachine = PageMachine.TestCase
