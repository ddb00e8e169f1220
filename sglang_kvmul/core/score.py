"""The LMetric score, `(queued + uncached) * (batch + 1)`, and the argmin every rule shares.

Pure functions on plain numbers: the live controller, the guard and the simulator all call these.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import compress, repeat
from operator import add, eq, mul

_PLUS_ONE = (1).__add__
_INF = float("inf")  # a ruled-out rank, inside the argmin only


def kvmul_scores(
    queued_uncached: Sequence[int],
    uncached: Sequence[int],
    batch_sizes: Sequence[int],
    time_per_token: Sequence[float] | None = None,
) -> list[float]:
    """Every rank's score for one request: the prefill work it would wait behind and add, times the
    batch it would join. The +1 keeps idle ranks (batch 0) distinguishable by their prefill work
    (LMetric's own choice). `time_per_token` counts the prefill work in each rank's measured time
    instead of tokens (the guard's remedy for ranks of different speed). Inlined: it runs for every
    rank of every request."""
    if not len(queued_uncached) == len(uncached) == len(batch_sizes):
        raise ValueError("one queue, uncached count and batch size per rank")
    if time_per_token is None:
        if min(queued_uncached, default=0) >= 0 and min(uncached, default=0) >= 0 and min(batch_sizes, default=0) >= 0:
            # the router's inputs are never negative: C-level maps (128+ ranks on every request)
            return list(map(mul, map(add, queued_uncached, uncached), map(_PLUS_ONE, batch_sizes)))
        return [
            ((q if q > 0 else 0) + (u if u > 0 else 0)) * ((b if b > 0 else 0) + 1)
            for q, u, b in zip(queued_uncached, uncached, batch_sizes, strict=True)
        ]
    return [
        ((q if q > 0 else 0) + (u if u > 0 else 0)) * t * ((b if b > 0 else 0) + 1)
        for q, u, b, t in zip(queued_uncached, uncached, batch_sizes, time_per_token, strict=True)
    ]


def pick_lowest(scores: Sequence[float], queued_uncached: Sequence[int], rotation: int) -> tuple[int, bool]:
    """Index of the lowest score, and whether it was a tie; ties go to the least queued work, then rotate.

    Rotating (instead of always the first index) stops idle, equally cached ranks from all
    sending their ties to rank 0, which would build a hotspot there.
    """
    if not scores:
        raise ValueError("no ranks to choose from")
    best = min(scores)
    if scores.count(best) == 1:  # the common case, at C speed
        return scores.index(best), False
    # ties are common (idle ranks sharing a system prompt): C-level passes, no per-rank Python
    count = scores.count(best)
    if count == len(scores):  # every rank tied (an idle deployment): no index lists at all
        tied, queued = range(count), queued_uncached
    else:
        tied = list(compress(range(len(scores)), map(eq, scores, repeat(best))))  # not best.__eq__: int vs float
        queued = list(map(queued_uncached.__getitem__, tied))
    least = min(queued)
    if queued.count(least) != len(tied):
        tied = list(compress(tied, map(eq, queued, repeat(least))))
    return tied[rotation % len(tied)], len(tied) > 1


def pick_lowest_among(
    scores: Sequence[float], allowed: Sequence[bool], queued_uncached: Sequence[int], rotation: int
) -> tuple[int, bool]:
    """`pick_lowest` over the ranks marked allowed (at least one must be): the others are never picked
    and their scores are left as they are for the caller to report."""
    return pick_lowest([x if ok else _INF for x, ok in zip(scores, allowed, strict=True)], queued_uncached, rotation)
