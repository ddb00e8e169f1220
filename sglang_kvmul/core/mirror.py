"""One rank's view of the shared radix index of cached pages, rebuilt from SGLang's KV events.

The router keeps ONE `SharedRadixIndex` for all ranks (one walk per request answers every rank);
a `RadixMirror` is a rank's handle on it, with the per-rank API the event and test code use. A
mirror made without an index gets a one-rank index of its own.
Pure data structure: no I/O, no SGLang import; events are passed in as plain fields.
"""

from __future__ import annotations

from collections.abc import Sequence

from sglang_kvmul.core.radix_index import SharedRadixIndex


class RadixMirror:
    """Rank `rank`'s cached pages in `index`."""

    def __init__(self, page_size: int, index: SharedRadixIndex | None = None, rank: int = 0) -> None:
        self.index = index if index is not None else SharedRadixIndex(1, page_size)
        if self.index.page_size != page_size:
            raise ValueError(f"page size {page_size} != the index's {self.index.page_size}")
        if not 0 <= rank < self.index.num_ranks:
            raise ValueError(f"rank {rank} outside the index's {self.index.num_ranks} ranks")
        self.page_size = page_size
        self.rank = rank

    @property
    def num_pages(self) -> int:
        return self.index.pages[self.rank]

    @property
    def num_tokens(self) -> int:
        return self.index.pages[self.rank] * self.page_size

    @property
    def orphan_blocks(self) -> int:
        return self.index.orphan_blocks[self.rank]

    def store(self, block_hashes: Sequence[int], parent_block_hash: int | None, token_ids: Sequence[int]) -> bool:
        """Apply a `BlockStored`; False when the parent is unknown (a missed event)."""
        return self.index.store(self.rank, block_hashes, parent_block_hash, token_ids)

    def remove(self, block_hashes: Sequence[int]) -> int:
        """Apply a `BlockRemoved`; pages below a removed page go too. Returns pages removed."""
        return self.index.remove(self.rank, block_hashes)

    def clear(self) -> None:
        """Apply `AllBlocksCleared` (flush_cache, scheduler start)."""
        self.index.clear(self.rank)

    def match(self, tokens: Sequence[int], root_hash: int | None, limit: int | None = None) -> int:
        """Length of the longest cached prefix of `tokens` on this rank (a multiple of the page size)."""
        return self.index.match(self.rank, tokens, root_hash, limit)
