"""A mirror of one rank's RadixAttention cache, rebuilt from SGLang's KV events.

Root pages are keyed by their published block hash, which already encodes the cache namespace
(salt, LoRA, extra_key in the dynamo format; see `block_hash`); every deeper page is keyed by its
tokens, so matching a prompt costs one dict step per page and no hashing. Block hashes are also
kept to apply `BlockRemoved` and to find the parent of a `BlockStored`.
Pure data structure: no I/O, no SGLang import; events are passed in as plain fields.
"""

from __future__ import annotations

from collections.abc import Sequence


class _Node:
    __slots__ = ("block_hash", "children", "key", "parent")

    def __init__(self, parent: _Node | None, key: object, block_hash: int) -> None:
        self.children: dict[object, _Node] = {}
        self.parent = parent
        self.key = key
        self.block_hash = block_hash


class RadixMirror:
    """One rank's cached pages, as a page tree under per-namespace root pages."""

    def __init__(self, page_size: int) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.page_size = page_size
        self._roots: dict[int, _Node] = {}  # first page's block hash -> its node
        self._by_hash: dict[int, _Node] = {}
        self.orphan_blocks = 0  # stored blocks whose parent this mirror never saw

    @property
    def num_pages(self) -> int:
        return len(self._by_hash)

    @property
    def num_tokens(self) -> int:
        return len(self._by_hash) * self.page_size

    def _key(self, tokens: Sequence[int], i: int) -> object:
        return tokens[i] if self.page_size == 1 else tuple(tokens[i : i + self.page_size])

    def store(self, block_hashes: Sequence[int], parent_block_hash: int | None, token_ids: Sequence[int]) -> bool:
        """Apply a `BlockStored`: a chain of pages under a parent page, or starting at a root page.

        Returns False when the parent is unknown (a missed event): the blocks cannot be placed.
        """
        if not block_hashes:
            return True
        ps = self.page_size
        if parent_block_hash is None:
            node = self._roots.get(block_hashes[0])
            if node is None:
                node = self._roots[block_hashes[0]] = _Node(None, None, block_hashes[0])
            self._by_hash[block_hashes[0]] = node
            start = 1
        else:
            node = self._by_hash.get(parent_block_hash)
            if node is None:
                self.orphan_blocks += len(block_hashes)
                return False
            start = 0
        for i in range(start, min(len(block_hashes), len(token_ids) // ps)):
            block_hash = block_hashes[i]
            key = self._key(token_ids, i * ps)
            child = node.children.get(key)
            if child is None:
                child = node.children[key] = _Node(node, key, block_hash)
            elif child.block_hash != block_hash:
                self._by_hash.pop(child.block_hash, None)
                child.block_hash = block_hash
            self._by_hash[block_hash] = child
            node = child
        return True

    def remove(self, block_hashes: Sequence[int]) -> int:
        """Apply a `BlockRemoved`; pages below a removed page go too. Returns pages removed."""
        removed = 0
        for block_hash in block_hashes:
            node = self._by_hash.get(block_hash)
            if node is None:
                continue
            if node.parent is None:
                self._roots.pop(node.block_hash, None)
            else:
                node.parent.children.pop(node.key, None)
            stack = [node]
            while stack:
                cur = stack.pop()
                if self._by_hash.get(cur.block_hash) is cur:
                    del self._by_hash[cur.block_hash]
                    removed += 1
                stack.extend(cur.children.values())
        return removed

    def clear(self) -> None:
        """Apply `AllBlocksCleared` (flush_cache, scheduler start)."""
        self._roots.clear()
        self._by_hash.clear()

    def match(self, tokens: Sequence[int], root_hash: int | None, limit: int | None = None) -> int:
        """Length of the longest cached prefix of `tokens` (a multiple of the page size).

        `root_hash` is the published hash of the prompt's first page in its namespace
        (`block_hash.first_page_hash`), or None for a prompt shorter than a page.
        """
        ps = self.page_size
        n = len(tokens) if limit is None else min(limit, len(tokens))
        node = self._roots.get(root_hash) if root_hash is not None else None
        if node is None or n < ps:
            return 0
        matched = ps
        if ps == 1:
            children = node.children
            for i in range(1, n):
                node = children.get(tokens[i])
                if node is None:
                    break
                children = node.children
                matched += 1
            return matched
        for i in range(ps, n - n % ps, ps):
            node = node.children.get(tuple(tokens[i : i + ps]))
            if node is None:
                break
            matched += ps
        return matched
