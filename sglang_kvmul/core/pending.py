"""Prompts dispatched to a rank whose blocks its KV events have not confirmed yet.

SGLang publishes a prompt's blocks only after its prefill, so siblings arriving meanwhile would
not see the shared prefix. Crediting the dispatched prompt as cache keeps them together. An entry
goes when the mirror confirms it, when SGLang's cumulative prefill counter shows the rank has
prefilled everything queued up to and including it (from then on the mirror is the truth: if the
blocks are not there they were evicted), or after `ttl` seconds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sglang_kvmul.core.prefix import common_prefix_len
from sglang_kvmul.core.tunables import PENDING_MAX_ENTRIES, PENDING_TTL_S


@dataclass
class _Entry:
    sent_at: float
    tokens: Sequence[int]
    root_hash: int | None  # first-page block hash: identifies the cache namespace
    prefilled_target: int  # the rank's cumulative prefilled tokens once this prompt is prefilled


class PendingPrefixes:
    """In-flight prompts of one rank."""

    def __init__(self, ttl: float = PENDING_TTL_S, max_entries: int = PENDING_MAX_ENTRIES) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.entries: list[_Entry] = []

    def __len__(self) -> int:
        return len(self.entries)  # (the router's hot path tests `entries` directly)

    def add(self, now: float, tokens: Sequence[int], root_hash: int | None, prefilled_target: int) -> None:
        # `tokens` is kept as given: the router passes tuples, so matching compares tuple to tuple
        self.entries.append(_Entry(now, tokens, root_hash, prefilled_target))
        if len(self.entries) > self.max_entries:
            del self.entries[0]

    def match(self, tokens: Sequence[int], root_hash: int | None) -> int:
        best = 0
        for e in self.entries:
            if e.root_hash == root_hash:
                best = max(best, common_prefix_len(tokens, e.tokens))
        return best

    def prune(
        self,
        now: float,
        prefilled: int,
        is_cached: Callable[[Sequence[int], int | None], bool],
    ) -> None:
        """Drop expired entries, those the rank has prefilled by now, and those the mirror confirms."""
        self.entries = [
            e
            for e in self.entries
            if now - e.sent_at < self.ttl and prefilled < e.prefilled_target and not is_cached(e.tokens, e.root_hash)
        ]
