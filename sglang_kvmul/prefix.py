"""How many prompt tokens SGLang's scheduler will take from the cache: the same formula it uses.

See `Req._compute_max_prefix_len` and `RadixCache.match_prefix` in SGLang 0.5.23: the match is
limited to len-1 (the last token is always computed, to get logits) and, for logprob requests, to
`logprob_start_len`; it is then rounded down to whole pages.
"""

from __future__ import annotations


def max_prefix_len(prompt_len: int, return_logprob: bool = False, logprob_start_len: int = -1) -> int:
    """Longest prefix the scheduler may reuse for this request."""
    limit = max(0, prompt_len - 1)
    if return_logprob and logprob_start_len is not None and logprob_start_len >= 0:
        limit = min(limit, logprob_start_len)
    return limit


def cached_tokens(matched: int, limit: int, page_size: int) -> int:
    """Tokens served from cache given the longest cached prefix `matched` and the scheduler's limit."""
    usable = max(0, min(matched, limit))
    return usable - usable % page_size


def uncached_tokens(prompt_len: int, matched: int, limit: int, page_size: int) -> int:
    """Tokens the rank has to prefill for this request."""
    return prompt_len - cached_tokens(matched, limit, page_size)
