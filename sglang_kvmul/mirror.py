"""A mirror of one rank's RadixAttention cache, rebuilt from SGLang's KV events.

Pages are keyed by their tokens (one dict step per page), so matching a prompt needs no hashing;
block hashes are kept only to apply `BlockRemoved` and to find the parent of a `BlockStored`.
Pure data structure: no I/O, no SGLang import; events are passed in as plain fields.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

# A cache namespace: SGLang keeps separate subtrees per (cache_salt, LoRA adapter).
Namespace = Hashable
DEFAULT_NAMESPACE: Namespace = (None, None)


def namespace_of(cache_salt: str | None, lora_name: str | None) -> Namespace:
    """Namespace key of a request or event; SGLang treats an empty salt as no salt."""
    return (cache_salt or None, lora_name or None)


class _Node:
    __slots__ = ("block_hash", "children", "key", "parent")

    def __init__(self, parent: _Node | None, key: object, block_hash: int | None) -> None:
        self.children: dict[object, _Node] = {}
        self.parent = parent
        self.key = key
        self.block_hash = block_hash


class RadixMirror:
    """One rank's cached pages, as a token-keyed page tree."""

    def __init__(self, page_size: int) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.page_size = page_size
        self._roots: dict[Namespace, _Node] = {}
        self._by_hash: dict[int, _Node] = {}
        self.orphan_blocks = 0  # stored blocks whose parent this mirror never saw

    @property
    def num_pages(self) -> int:
        return len(self._by_hash)

    @property
    def num_tokens(self) -> int:
        return len(self._by_hash) * self.page_size

    def _page_keys(self, tokens: Sequence[int], limit: int) -> list[object]:
        ps = self.page_size
        n = (min(limit, len(tokens)) // ps) * ps
        if ps == 1:
            return list(tokens[:n])
        return [tuple(tokens[i : i + ps]) for i in range(0, n, ps)]

    def store(
        self,
        block_hashes: Sequence[int],
        parent_block_hash: int | None,
        token_ids: Sequence[int],
        namespace: Namespace = DEFAULT_NAMESPACE,
    ) -> bool:
        """Apply a `BlockStored`: a chain of pages under a parent page (or the namespace root).

        Returns False when the parent is unknown (a missed event): the blocks cannot be placed.
        """
        if parent_block_hash is None:
            node = self._roots.get(namespace)
            if node is None:
                node = self._roots[namespace] = _Node(None, None, None)
        else:
            node = self._by_hash.get(parent_block_hash)
            if node is None:
                self.orphan_blocks += len(block_hashes)
                return False
        keys = self._page_keys(token_ids, len(block_hashes) * self.page_size)
        for block_hash, key in zip(block_hashes, keys, strict=False):
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
            if node.parent is not None:
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

    def match(self, tokens: Sequence[int], namespace: Namespace = DEFAULT_NAMESPACE, limit: int | None = None) -> int:
        """Length of the longest cached prefix of `tokens` (a multiple of the page size)."""
        node = self._roots.get(namespace)
        if node is None:
            return 0
        ps = self.page_size
        n = len(tokens) if limit is None else min(limit, len(tokens))
        matched = 0
        if ps == 1:
            children = node.children
            for i in range(n):
                node = children.get(tokens[i])
                if node is None:
                    break
                children = node.children
                matched += 1
            return matched
        for i in range(0, n - n % ps, ps):
            node = node.children.get(tuple(tokens[i : i + ps]))
            if node is None:
                break
            matched += ps
        return matched
