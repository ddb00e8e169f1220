"""A rank's radix prefix cache as SGLang runs it, for the simulator: pages, references, LRU eviction.

What matters for routing and is modelled: page granularity, prompts inserted after their prefill,
pages referenced by running requests never evicted, eviction of unreferenced leaves in LRU order,
and the KV events SGLang publishes for all of it (`BlockStored` chains with their parent page,
`BlockRemoved`, `AllBlocksCleared`), so that the production router mirrors it exactly.
Hashes: the root page's is SGLang's published first-page hash (`block_hash.first_page_hash`, as the
router recomputes it); deeper pages chain their parent's hash with their tokens.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field

from sglang_kvmul.core.block_hash import first_page_hash
from sglang_kvmul.core.events import BlockRemoved, BlockStored, KVEvent

HASH_MASK = (1 << 63) - 1


@dataclass(eq=False, slots=True)
class Page:
    key: tuple[int, ...]
    hash: int
    parent: Page | None
    children: dict[tuple[int, ...], Page] = field(default_factory=dict)
    refs: int = 0
    last_used: float = 0.0


class SimPrefixCache:
    """`capacity_pages` KV pages; `match`, `insert`, `ref`/`unref`, `evict`, and the events they cause."""

    def __init__(self, page_size: int, capacity_pages: int) -> None:
        self.page_size = page_size
        self.capacity_pages = capacity_pages
        self.roots: dict[tuple[int, ...], Page] = {}
        self.num_pages = 0
        self.evicted_pages = 0
        self.locked_pages = 0  # pages some request references: not evictable (SGLang's protected size)
        self.events: list[KVEvent] = []
        self._lru: list[tuple[float, int, Page]] = []  # candidate leaves, validated when popped
        self._seq = 0

    def match(self, tokens: Sequence[int], limit: int | None = None) -> list[Page]:
        """The cached pages of the longest prefix of `tokens[:limit]` (a tuple slices fastest)."""
        ps = self.page_size
        n = len(tokens) if limit is None else min(limit, len(tokens))
        path: list[Page] = []
        children = self.roots
        for i in range(0, n - n % ps, ps):
            page = children.get(tuple(tokens[i : i + ps]))
            if page is None:
                break
            path.append(page)
            children = page.children
        return path

    def touch(self, path: Sequence[Page], now: float) -> None:
        for page in path:
            page.last_used = now

    def ref(self, path: Sequence[Page]) -> None:
        for page in path:
            if not page.refs:
                self.locked_pages += 1
            page.refs += 1

    def unref(self, path: Sequence[Page], now: float) -> None:
        for page in path:
            page.refs -= 1
            if not page.refs:
                self.locked_pages -= 1
            page.last_used = now
        if path:
            self._candidate(path[-1])

    def _candidate(self, page: Page) -> None:
        if not page.children and page.refs == 0:
            self._seq += 1
            heapq.heappush(self._lru, (page.last_used, self._seq, page))

    def insert(self, tokens: Sequence[int], now: float) -> list[Page]:
        """Cache the whole pages of `tokens` (callers make room first); returns its page path."""
        path = self.match(tokens)
        ps = self.page_size
        start, end = len(path) * ps, len(tokens) - len(tokens) % ps
        parent = path[-1] if path else None
        children = parent.children if parent is not None else self.roots
        new_hashes = []
        for i in range(start, end, ps):
            key = tuple(tokens[i : i + ps])
            h = first_page_hash(key, ps) if parent is None else hash((parent.hash, key)) & HASH_MASK
            page = Page(key, h, parent, {}, 0, now)
            children[key] = page
            path.append(page)
            new_hashes.append(h)
            parent, children = page, page.children
        if new_hashes:
            first = path[len(path) - len(new_hashes)]
            parent_hash = first.parent.hash if first.parent is not None else None
            self.events.append(BlockStored(new_hashes, parent_hash, list(tokens[start:end])))
            self.num_pages += len(new_hashes)
        self.touch(path[: len(path) - len(new_hashes)], now)  # new pages carry `now` already
        if path:
            self._candidate(path[-1])
        return path

    @property
    def free_pages(self) -> int:
        return self.capacity_pages - self.num_pages

    def evict(self, pages: int) -> int:
        """Free up to `pages` pages, least recently used unreferenced leaves first. Returns pages freed."""
        freed, removed = 0, []
        while freed < pages and self._lru:
            last_used, _, page = heapq.heappop(self._lru)
            if page.children or page.refs or page.last_used != last_used or not self._attached(page):
                continue  # stale candidate: re-queued whenever it becomes a free leaf again
            siblings = page.parent.children if page.parent is not None else self.roots
            del siblings[page.key]
            self.num_pages -= 1
            self.evicted_pages += 1
            freed += 1
            removed.append(page.hash)
            if page.parent is not None:
                self._candidate(page.parent)
        if removed:
            # one event per eviction pass, as SGLang evicts whole nodes; a chain is evicted leaf
            # first, so listing it reversed names each chain's shallowest page first
            self.events.append(BlockRemoved(removed[::-1]))
        return freed

    def _attached(self, page: Page) -> bool:
        siblings = page.parent.children if page.parent is not None else self.roots
        return siblings.get(page.key) is page

    def take_events(self) -> list[object]:
        out, self.events = self.events, []
        return out
