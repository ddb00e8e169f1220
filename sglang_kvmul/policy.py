"""The LMetric scheduling rule: score = (queued + uncached) * (batch + 1), lowest wins.

Pure functions on plain integers so that the live controller and the simulator share them.
"""

from __future__ import annotations

from collections.abc import Sequence


def kvmul_score(queued_uncached: int, uncached: int, batch_size: int) -> int:
    """Prefill work the request would wait behind and add, times the batch it would join.

    The +1 keeps idle ranks (batch 0) distinguishable by their prefill work (LMetric's own choice).
    """
    return (max(0, queued_uncached) + max(0, uncached)) * (max(0, batch_size) + 1)


def kvmul_scores(queued_uncached: Sequence[int], uncached: Sequence[int], batch_sizes: Sequence[int]) -> list[int]:
    """Scores of every rank for one request: `kvmul_score`, inlined (it runs for every rank of every request)."""
    return [
        ((q if q > 0 else 0) + (u if u > 0 else 0)) * ((b if b > 0 else 0) + 1)
        for q, u, b in zip(queued_uncached, uncached, batch_sizes, strict=True)
    ]


def pick_lowest(scores: Sequence[int], queued_uncached: Sequence[int], rotation: int) -> tuple[int, bool]:
    """Index of the lowest score, and whether it was a tie; ties go to the least queued work, then rotate.

    Rotating (instead of always the first index) stops idle, equally cached ranks from all
    sending their ties to rank 0, which would build a hotspot there.
    """
    if not scores:
        raise ValueError("no ranks to choose from")
    best = min(scores)
    tied = [i for i, s in enumerate(scores) if s == best]
    if len(tied) > 1:
        least = min(queued_uncached[i] for i in tied)
        tied = [i for i in tied if queued_uncached[i] == least]
    return tied[rotation % len(tied)], len(tied) > 1
