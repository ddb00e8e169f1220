"""What one more request in a rank's decode batch costs the others, in prefill tokens, from the step
times SGLang itself measures.

The prefill terms of the rules price a request by the prefill it queues and the decodes its prefill
pauses. A request also decodes: for each of its output steps it makes every co-running request's
step slower by the per-request slope of the step time, and its own steps are as slow as the batch it
joins. SGLang's load snapshots carry the least-squares sums of decode step time against batch size
(`decode_moments`) and the cumulative prefill time per prefilled token; the ledger counts requests
past prefill. Together they give, with no weight, the prefill-token equivalent of one more
request in a decode batch over one request's output. Pooled over ranks: one estimate from many
steps, the same for every rank, so measurement noise between equal ranks does not move decisions.

The same sums, rank by rank against the pooled fit, and each rank's prefill time per token tell a
slow rank from the others (`rank_slowdown`). Each measure alone moves with the work a rank gets:
identical simulated ranks measure prefill times per token up to 1.9x apart (short cached suffixes pay
a step's fixed cost over few tokens) and decode times over the fit up to 1.21x apart (long contexts);
a rank counts as slow only by as much as both say so.
"""

from __future__ import annotations

from collections.abc import Sequence

from sglang_kvmul.core.tunables import (
    MIN_DECODE_STEPS_FOR_SLOPE,
    MIN_FINISHED_FOR_SPREAD,
    MIN_TOKENS_FOR_SPEED,
    SPEED_SPREAD,
)

_EMPTY = (0.0,) * 5


class PooledRows:
    """Each rank's latest cumulative figures and their sums over the ranks, kept by difference: a
    rank's snapshot costs O(figures), not O(ranks)."""

    def __init__(self, num_ranks: int, width: int) -> None:
        self.rows: list[tuple[float, ...]] = [(0.0,) * width] * num_ranks
        self.totals = [0.0] * width

    def set(self, rank: int, row: tuple[float, ...]) -> list[float]:
        """Replace `rank`'s figures; returns the sums over the ranks (the live list: read, do not keep)."""
        old, self.rows[rank] = self.rows[rank], row
        totals = self.totals
        for i, (new, was) in enumerate(zip(row, old, strict=True)):
            totals[i] += new - was
        return totals


def step_slope_us(n: float, sb: float, st: float, sbb: float, sbt: float) -> float:
    """Least-squares slope of decode step time (us) on batch size; 0.0 when the batches did not vary
    (no slope can be told from one batch size) or the fit is negative (noise: a larger batch is not
    faster)."""
    var = n * sbb - sb * sb
    if var <= 1e-9 * n * sbb:
        return 0.0
    return max(0.0, (n * sbt - sb * st) / var)


class PooledDecodeCost:
    """Running totals of every rank's measurements; `tokens_per_request` is recomputed when one rank's
    figures change (on its load snapshot), so a decision reads one float."""

    def __init__(self, num_ranks: int) -> None:
        # per rank: the five moment sums, prefill busy us, prefilled tokens, requests past prefill
        self._pool = PooledRows(num_ranks, 8)
        self.steps = 0.0  # decode steps measured, all ranks
        self.slope_us = 0.0  # per request per decode step
        self.prefill_us_per_token = 0.0
        self.steps_per_request = 0.0  # the mean output, in decode steps
        self.tokens_per_request = 0.0  # what one more request in a batch costs, in prefill tokens
        self.batch_mean = 0.0  # requests per decode step, all ranks
        self.output_tokens = 0.0  # how long one request's output lasts, in prefill tokens
        # how much slower each rank runs (`rank_slowdown`); None: to be recomputed when next read
        self._slowdown: list[float] | None = []

    def update(self, rank: int, moments: Sequence[float], busy_us: int, tokens: int, decoders: int) -> None:
        """One rank's cumulative figures as of its last snapshot. (SGLang's sums are of integers:
        kept by difference they stay exact far beyond any run's totals.)"""
        row = (*(moments[:5] if len(moments) >= 5 else _EMPTY), busy_us, tokens, decoders)
        totals = self._pool.set(rank, row)
        sums, busy, prefilled, decoders_all = totals[:5], totals[5], totals[6], totals[7]
        self.steps = sums[0]
        if sums[0] < MIN_DECODE_STEPS_FOR_SLOPE or prefilled < MIN_TOKENS_FOR_SPEED or not decoders_all or not busy:
            # not measured (yet, or no longer): every figure says so, not an older estimate
            self.slope_us = self.prefill_us_per_token = self.steps_per_request = self.tokens_per_request = 0.0
            self.batch_mean = self.output_tokens = 0.0
            self._slowdown = []
            return
        self.slope_us = step_slope_us(*sums)
        self._slowdown = None  # O(ranks): computed when a rule reads it, not on every snapshot
        self.prefill_us_per_token = busy / prefilled
        self.steps_per_request = sums[1] / decoders_all  # request-steps per request past prefill
        self.batch_mean = sums[1] / sums[0]
        # An output's duration on the clock: its decode steps, each with its share of the prefill steps
        # that run between decode steps (with mixed chunks too: the decodes done inside prefill steps
        # are missing from both the steps per request and the steps, so the ratio holds)
        self.output_tokens = self.steps_per_request * ((sums[2] + busy) / sums[0]) / self.prefill_us_per_token
        # Joining a batch of B, counted like the prefill terms, over the requests there now: each has
        # on average half a request's output left, and for that overlap its steps are slower by the
        # slope and so are the newcomer's: 2 * slope * steps/2 * B. (Counting also those that will
        # join, for the newcomer's whole output, doubles it: tried, it moved too many requests off
        # their prefixes; README, "Decode cost, measured".)
        self.tokens_per_request = self.slope_us * self.steps_per_request / self.prefill_us_per_token

    @property
    def rank_slowdown(self) -> list[float]:
        """How much slower each rank runs, mean 1, where its decode steps and prefill tokens agree
        (empty: not measured, or within SPEED_SPREAD; a new list on each change, never mutated).
        Computed on the first read after a snapshot changed it, so a snapshot stays O(1)."""
        if self._slowdown is None:
            self._slowdown = self._rank_slowdown(self._pool.totals[:5])
        return self._slowdown

    def _rank_slowdown(self, sums: Sequence[float]) -> list[float]:
        """Per rank, how much slower it runs than the others (mean 1), from both of its measures:
        its decode time over the pooled least-squares line's prediction for the same batches, and its
        prefill time per token, each over the ranks' mean. A rank counts as slow (fast) only by as
        much as both say so: each measure alone is swayed by the work a rank happens to get (long
        contexts slow decode steps, short cached suffixes raise the prefill time per token), and a
        rank that is really slower is slower at both. Unmeasured ranks (MIN_DECODE_STEPS_FOR_SLOPE
        steps, MIN_TOKENS_FOR_SPEED tokens) count as 1. Empty when the ranks are within SPEED_SPREAD
        of each other: below that it is noise, and equal ranks keep exactly the decisions of a rule
        without it. O(ranks), once per changed snapshot."""
        n, sb, st = sums[0], sums[1], sums[2]
        slope = self.slope_us
        intercept = (st - slope * sb) / n
        decode: list[float | None] = []
        prefill: list[float | None] = []
        for row in self._pool.rows:
            predicted = intercept * row[0] + slope * row[1]
            decode.append(row[2] / predicted if row[0] >= MIN_DECODE_STEPS_FOR_SLOPE and predicted > 0 else None)
            prefill.append(row[5] / row[6] if row[6] >= MIN_TOKENS_FOR_SPEED and row[5] > 0 else None)
        return agreed_slowdown(_over_mean(decode), _over_mean(prefill))


class PooledOutputSpread:
    """How much more of its TPOT a pause costs a request that has not decoded yet than one of the mean
    output, from the outputs of the requests that finished (counted by the schedulers at finish:
    `serving.fresh_outputs`), pooled over ranks.

    A prefill of t pauses each request running on its rank for t; the rules' pause term counts t per
    paused request. A request with O output tokens loses t / (O - 1) of its TPOT to it. Of a request
    that has decoded a while the router knows only that it is running, and counts it as of the mean
    output Obar. Of one that has not decoded yet (just prefilled, or waiting: it will be, when a prefill
    queued behind it runs) the output is any the fleet serves, and the pause costs its TPOT E[1 / (O -
    1)] x t on average: (Obar - 1) x E[1 / (O - 1)] times the mean output's t / (Obar - 1). That ratio is
    the weight: 1 when every output is as long, at least 1 always (Jensen), large where many outputs
    are a few tokens (a pause of a second on a 3-token answer is 500 ms of its TPOT). No constant: the
    outputs are those the fleet served."""

    def __init__(self, num_ranks: int) -> None:
        self._pool = PooledRows(num_ranks, 3)  # per rank: count, sum O, sum 1/(O-1)
        self.finished = 0.0  # finished requests with two or more output tokens, all ranks
        self.output_mean = 0.0  # their mean output (0.0: none)
        self.inverse_mean = 0.0  # their mean 1 / (output - 1) (0.0: none)
        self.fresh_pause_weight = 1.0  # 1.0 until MIN_FINISHED_FOR_SPREAD outputs are measured

    def update(self, rank: int, finished: Sequence[float]) -> None:
        """One rank's cumulative (count, sum of outputs, sum of 1 / (output - 1)) as of its last snapshot
        (empty: not reported, as from SGLang without this package's hook)."""
        n, outputs, inverse = self._pool.set(rank, tuple(finished) if len(finished) == 3 else (0.0, 0.0, 0.0))
        self.finished = n
        self.output_mean, self.inverse_mean = (outputs / n, inverse / n) if n > 0 else (0.0, 0.0)
        if n < MIN_FINISHED_FOR_SPREAD:
            self.fresh_pause_weight = 1.0
            return
        self.fresh_pause_weight = max(1.0, (self.output_mean - 1.0) * self.inverse_mean)


def _over_mean(xs: list[float | None]) -> list[float | None]:
    measured = [x for x in xs if x is not None]
    mean = sum(measured) / len(measured) if measured else 0.0
    return [None if x is None or not mean else x / mean for x in xs]


def agreed_slowdown(a: Sequence[float | None], b: Sequence[float | None]) -> list[float]:
    """Per rank, the smaller of two relative slowdowns where both lie on the same side of 1 (else 1,
    as for a rank either does not measure), scaled to mean 1; empty when the result spans no more
    than SPEED_SPREAD."""
    out = []
    for x, y in zip(a, b, strict=True):
        if x is None or y is None or (x - 1.0) * (y - 1.0) <= 0:
            out.append(1.0)
        else:
            out.append(min(x, y) if x > 1.0 else max(x, y))
    if max(out) <= SPEED_SPREAD * min(out):
        return []
    mean = sum(out) / len(out)
    return [x / mean for x in out]
