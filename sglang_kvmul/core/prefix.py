"""How many prompt tokens SGLang's scheduler will take from the cache: the same formula it uses.

See `Req._compute_max_prefix_len` and `RadixCache.match_prefix` in SGLang 0.5.23: the match is
limited to len-1 (the last token is always computed, to get logits) and, for logprob requests, to
`logprob_start_len`; it is then rounded down to whole pages.
"""

from __future__ import annotations

from collections.abc import Sequence


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


def common_prefix_len(a: Sequence[int], b: Sequence[int], start: int = 0, stop: int | None = None) -> int:
    """Length of the common prefix of `a[start:stop]` and `b`.

    Compares growing chunks with C-level slice equality, then bisects inside the first chunk that
    differs: about one pass over the common prefix plus two over one chunk, with no copy of `a`
    beyond the slices compared (prompts reach 100k+ tokens on the routing hot path).
    """
    n = min((len(a) if stop is None else stop) - start, len(b))
    lo, chunk = 0, 256
    while lo < n:
        hi = min(n, lo + chunk)
        if a[start + lo : start + hi] != b[lo:hi]:
            while lo + 1 < hi:  # a[start:start+lo] == b[:lo]; the first difference is in [lo, hi)
                mid = (lo + hi) // 2
                if a[start + lo : start + mid] == b[lo:mid]:
                    lo = mid
                else:
                    hi = mid
            return lo
        lo = hi
        chunk = min(chunk * 2, 8192)
    return max(n, 0)
