"""KV page bookkeeping: a fixed pool of pages, per-sequence block tables, reference counts,
prefix caching by chained page hashes, copy-on-write, and LRU eviction of cached pages.

Pure host-side state; the device arrays live in the model runner, which applies the page
copies this module asks for (copy-on-write) before a step.

A page reused by another sequence is never zeroed: every kernel reads only slots below a
sequence's length, and a sequence writes each of its slots before its length covers it, so
stale contents are never readable (the paged kernels' tests fill unused pages with NaN to hold
them to that).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from jaxllm.errors import JaxLLMError


def page_hash(parent: int | None, tokens: Sequence[int]) -> int:
    """Hash of a full page, chained with its parent's so equal hashes mean equal prefixes."""
    return hash((parent, tuple(tokens)))


@dataclass
class SeqPages:
    """One sequence's pages: `table[i]` holds token slots [i * page_size, (i + 1) * page_size)."""

    table: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)  # of the leading full, hashed pages


# Free pages held back after a sequence's newest page for it to grow into (soft: anyone takes
# them once no other page is free). Decode attention reads each sequence's pages in order, and
# scattered 2 KB pages cost it 2x contiguous ones (DRAM locality); without holds, 64 sequences
# taking pages in turn left each one's pages apart.
GROWTH_PAGES = 16


class BlockManager:
    """Owns pages 0..num_pages-1.

    A page is *free* (refcount 0) or *used*. Free pages that hold a full, hashed page of tokens
    stay findable by prefix lookups until they are handed out again, oldest-freed first (LRU).
    """

    def __init__(self, num_pages: int, page_size: int, *, enable_prefix_caching: bool = True):
        if num_pages < 1 or page_size < 1:
            raise JaxLLMError(
                f"need num_pages >= 1 and page_size >= 1, got {num_pages}, {page_size}"
            )
        self.num_pages = num_pages
        self.page_size = page_size
        self.prefix_caching = enable_prefix_caching
        self.ref = [0] * num_pages
        self.page_hash: list[int | None] = [None] * num_pages
        # Free pages in eviction order (front = next handed out). Values unused.
        self.free: OrderedDict[int, None] = OrderedDict((p, None) for p in range(num_pages))
        self.cached: dict[int, int] = {}  # hash -> page holding that prefix page
        self.held: dict[int, str] = {}  # free page -> the sequence it is held for
        self.seqs: dict[str, SeqPages] = {}
        self.hits = 0  # prefix-cache hits, in tokens
        self.queries = 0  # prompt tokens looked up

    # ------------------------------------------------------------------ queries
    @property
    def num_free(self) -> int:
        return len(self.free)

    def pages_needed(self, seq_id: str, num_tokens: int) -> int:
        """Extra pages `seq_id` needs to hold `num_tokens` tokens in all."""
        have = len(self.seqs[seq_id].table) if seq_id in self.seqs else 0
        return max(0, -(-num_tokens // self.page_size) - have)

    def table(self, seq_id: str) -> list[int]:
        return self.seqs[seq_id].table

    # ------------------------------------------------------------------ allocation
    def _take_free(self, seq_id: str | None = None) -> int:
        """A free page: for `seq_id`, the page after its newest one if that is free and not
        held for another sequence; else the first in eviction order not held for another
        sequence; else the first. For `seq_id`, the pages after the one taken are held."""
        page = None
        seq = self.seqs.get(seq_id) if seq_id is not None else None
        if seq is not None and seq.table:
            nxt = seq.table[-1] + 1
            if nxt in self.free and self.page_hash[nxt] is None:
                if self.held.get(nxt, seq_id) == seq_id:
                    page = nxt
        if page is None:
            page = next(
                (p for p in self.free if self.held.get(p, seq_id) == seq_id),
                next(iter(self.free)),
            )
        del self.free[page]
        self.held.pop(page, None)
        h = self.page_hash[page]
        if h is not None:  # evict its cached prefix entry
            if self.cached.get(h) == page:
                del self.cached[h]
            self.page_hash[page] = None
        self.ref[page] = 1
        if seq_id is not None:
            for q in range(page + 1, min(page + 1 + GROWTH_PAGES, self.num_pages)):
                if q in self.free and self.page_hash[q] is None and q not in self.held:
                    self.held[q] = seq_id
        return page

    def lookup_prefix(self, tokens: Sequence[int]) -> tuple[list[int], list[int]]:
        """Longest run of cached full pages that prefixes `tokens` (at least one token is left
        to compute, so a prompt that is all cached gives up its last page)."""
        pages, hashes, parent = [], [], None
        if not self.prefix_caching:
            return pages, hashes
        n_full = (len(tokens) - 1) // self.page_size
        for i in range(n_full):
            h = page_hash(parent, tokens[i * self.page_size : (i + 1) * self.page_size])
            page = self.cached.get(h)
            if page is None:
                break
            pages.append(page)
            hashes.append(h)
            parent = h
        return pages, hashes

    def allocate_prompt(self, seq_id: str, tokens: Sequence[int], lookup: bool = True) -> int:
        """Start `seq_id`, sharing any cached prefix pages (unless not `lookup`). Returns
        tokens already computed.

        Takes no fresh pages: `allocate` does, as chunks are scheduled.
        """
        if seq_id in self.seqs:
            raise JaxLLMError(f"sequence {seq_id!r} already has pages")
        pages, hashes = self.lookup_prefix(tokens) if lookup else ([], [])
        for p in pages:
            if self.ref[p] == 0:
                del self.free[p]
                self.held.pop(p, None)
            self.ref[p] += 1
        self.seqs[seq_id] = SeqPages(list(pages), list(hashes))
        self.queries += len(tokens)
        self.hits += len(pages) * self.page_size
        return len(pages) * self.page_size

    def can_allocate(self, seq_id: str, num_tokens: int) -> bool:
        need = self.pages_needed(seq_id, num_tokens) + self.needs_copy_on_write(seq_id)
        return need <= self.num_free

    def allocate(self, seq_id: str, num_tokens: int) -> list[tuple[int, int]]:
        """Grow `seq_id` to hold `num_tokens` tokens, and make its page for the next write
        private. Returns page copies (src, dst) the caller must perform first (copy-on-write).
        Raises if pages run out (check `can_allocate`, which counts fresh pages; a
        copy-on-write needs one more)."""
        seq = self.seqs.setdefault(seq_id, SeqPages())
        copies = []
        need = self.pages_needed(seq_id, num_tokens)
        if need > self.num_free:
            raise JaxLLMError(f"out of KV pages: need {need}, {self.num_free} free")
        # Copy-on-write: the partly filled last page is about to be written; if another
        # sequence shares it, this one gets its own copy.
        if seq.table and self.ref[seq.table[-1]] > 1 and len(seq.table) > len(seq.hashes):
            if self.num_free < need + 1:
                raise JaxLLMError(f"out of KV pages: need {need + 1}, {self.num_free} free")
            old = seq.table[-1]
            new = self._take_free()
            self.ref[old] -= 1
            seq.table[-1] = new
            copies.append((old, new))
        for _ in range(need):
            seq.table.append(self._take_free(seq_id))
        return copies

    def needs_copy_on_write(self, seq_id: str) -> bool:
        seq = self.seqs.get(seq_id)
        return bool(
            seq and seq.table and self.ref[seq.table[-1]] > 1 and len(seq.table) > len(seq.hashes)
        )

    def commit_full_pages(self, seq_id: str, tokens: Sequence[int]) -> None:
        """Register the hashes of `seq_id`'s pages that `tokens` (its computed tokens) fill."""
        seq = self.seqs[seq_id]
        n_full = min(len(tokens) // self.page_size, len(seq.table))
        parent = seq.hashes[-1] if seq.hashes else None
        for i in range(len(seq.hashes), n_full):
            h = page_hash(parent, tokens[i * self.page_size : (i + 1) * self.page_size])
            seq.hashes.append(h)
            page = seq.table[i]
            if self.prefix_caching and h not in self.cached and self.page_hash[page] is None:
                self.cached[h] = page
                self.page_hash[page] = h
            parent = h

    def fork(self, parent_id: str, child_id: str) -> None:
        """`child_id` shares every page of `parent_id` (n > 1 samples, beams)."""
        if child_id in self.seqs:
            raise JaxLLMError(f"sequence {child_id!r} already has pages")
        src = self.seqs[parent_id]
        for p in src.table:
            self.ref[p] += 1
        self.seqs[child_id] = SeqPages(list(src.table), list(src.hashes))

    def free_seq(self, seq_id: str) -> None:
        """Release `seq_id`'s pages; its last pages become the first to be evicted."""
        seq = self.seqs.pop(seq_id, None)
        if seq is None:
            return
        self.held = {p: s for p, s in self.held.items() if s != seq_id}
        for p in reversed(seq.table):
            self.ref[p] -= 1
            if self.ref[p] < 0:
                raise AssertionError(f"page {p} freed twice")
            if self.ref[p] == 0:
                self.free[p] = None
                if self.page_hash[p] is None:  # uncached pages go first
                    self.free.move_to_end(p, last=False)

    # ------------------------------------------------------------------ checks
    def check(self) -> None:
        """Internal consistency (tests): refcounts equal table references, free <=> ref 0."""
        counts = [0] * self.num_pages
        for seq in self.seqs.values():
            for p in seq.table:
                counts[p] += 1
        assert counts == self.ref, "refcounts disagree with block tables"
        for p in range(self.num_pages):
            assert (self.ref[p] == 0) == (p in self.free), f"page {p} free-list mismatch"
        for h, p in self.cached.items():
            assert self.page_hash[p] == h, f"cached hash of page {p} mismatch"
        for p, s in self.held.items():
            assert p in self.free and s in self.seqs, f"page {p} held but not free for {s}"
