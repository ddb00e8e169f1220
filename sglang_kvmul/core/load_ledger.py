"""Per-rank load as the controller sees it between SGLang's load snapshots.

SGLang publishes a snapshot per rank only after prefill batches, every Nth decode batch and when
idle, so a burst dispatched in between would all see the same stale load and pile onto one rank.
The ledger therefore adds what the controller itself sent since the snapshot, and keeps the
queued (not yet prefilled) uncached tokens from its own predictions, drained by the snapshot's
cumulative prefill counter. Pure bookkeeping: times are passed in, in `time.time()` seconds.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from math import isfinite

from sglang_kvmul.core.tunables import MIN_TOKENS_FOR_SPEED, RECV_SLACK_S

# `decode_moments` past SGLang's six sums, as this package's scheduler hook appends them
# (`serving.fresh_outputs`; the simulator writes the same): the running requests that have not
# decoded past their first token, then the finished requests with two or more output tokens: their
# count, their outputs' sum, and the sum of 1 / (output - 1). Absent (SGLang alone, the upstream
# patch): no request counts as fresh and no output is measured.
FRESH, FINISHED = 6, slice(7, 10)


@dataclass
class LoadSnapshotView:
    """The fields of SGLang's `LoadSnapshot` the ledger uses."""

    timestamp: float
    num_running_reqs: int
    num_waiting_reqs: int
    num_waiting_uncached_tokens: int
    total_prefill_uncached_tokens: int
    num_total_tokens: int = 0  # KV tokens held by requests, plus the pending ones
    max_running_requests: int = 0  # capacity (0: unknown); read by the guard
    max_total_num_tokens: int = 0
    total_prefill_busy_us: int = 0  # cumulative time in prefill, beside total_prefill_uncached_tokens
    # SGLang's decode step-time moment sums (steps, sum b, sum t_us, sum b^2, sum b*t_us, generated):
    # enough for a least-squares step time a + k * batch, and the items at FRESH and FINISHED. None:
    # no decode step measured yet.
    decode_moments: list[float] | None = None


@dataclass
class RankLoad:
    """Load of one rank: batch size and queued uncached prefill tokens."""

    snap_time: float = 0.0
    snap_running: int = 0
    snap_waiting: int = 0
    snap_kv_tokens: int = 0
    prefilled_seen: int = 0
    queued_uncached: int = 0
    recent: deque[tuple[float, int]] = field(default_factory=deque)  # (dispatch time, uncached)
    resyncs: int = 0  # times an idle snapshot reset the queued-token ledger

    kv_since: int = 0  # prompt tokens dispatched since the last snapshot
    max_running: int = 0  # SGLang's max_running_requests (0: not reported)
    max_kv_tokens: int = 0  # SGLang's max_total_num_tokens (0: not reported)
    prefill_busy_us: int = 0  # cumulative, as reported
    decode_moments: tuple[float, ...] = ()  # cumulative, as reported (empty: none yet)
    dispatched: int = 0  # requests sent to the rank, ever
    decoders_seen: int = 0  # of those, seen past prefill (running or finished) at the last snapshot

    @property
    def prefill_us_per_token(self) -> float:
        """Measured prefill time per uncached token (0.0 until a few chunks were prefilled)."""
        return self.prefill_busy_us / self.prefilled_seen if self.prefilled_seen >= MIN_TOKENS_FOR_SPEED else 0.0

    @property
    def running(self) -> int:
        return self.snap_running

    @property
    def fresh(self) -> int:
        """Running requests that had not decoded past their first token at the last snapshot (0: not reported)."""
        m = self.decode_moments
        return int(m[FRESH]) if len(m) > FRESH else 0

    @property
    def finished_outputs(self) -> tuple[float, ...]:
        """Cumulative (count, sum of outputs, sum of 1 / (output - 1)) of the finished requests with two
        or more output tokens (empty: not reported)."""
        m = self.decode_moments
        return m[FINISHED] if len(m) >= FINISHED.stop else ()

    @property
    def waiting(self) -> int:
        """Waiting at the last snapshot, plus requests dispatched since."""
        return self.snap_waiting + len(self.recent)

    @property
    def batch_size(self) -> int:
        """Running + waiting at the last snapshot, plus requests dispatched since."""
        return self.snap_running + self.snap_waiting + len(self.recent)

    @property
    def kv_tokens(self) -> int:
        """KV tokens the rank's requests hold or will hold (Dynamo's active blocks, in tokens)."""
        return self.snap_kv_tokens + self.kv_since

    def on_dispatch(self, now: float, uncached: int, prompt_len: int = 0) -> None:
        self.recent.append((now, uncached))
        self.dispatched += 1
        self.queued_uncached += uncached
        self.kv_since += prompt_len

    def on_snapshot(self, snap: LoadSnapshotView) -> bool:
        """Fold in a snapshot; returns False if it is not newer than the last one."""
        if snap.timestamp <= self.snap_time:
            return False
        self.snap_time = snap.timestamp
        self.snap_running = snap.num_running_reqs
        self.snap_waiting = snap.num_waiting_reqs
        self.snap_kv_tokens = getattr(snap, "num_total_tokens", 0)
        self.max_running = getattr(snap, "max_running_requests", 0) or 0
        self.max_kv_tokens = getattr(snap, "max_total_num_tokens", 0) or 0
        self.prefill_busy_us = getattr(snap, "total_prefill_busy_us", 0) or 0
        self.kv_since = 0
        done = snap.total_prefill_uncached_tokens - self.prefilled_seen
        if done < 0:  # the scheduler restarted and its counter began again
            done = snap.total_prefill_uncached_tokens
        self.prefilled_seen = snap.total_prefill_uncached_tokens
        self.queued_uncached = max(0, self.queued_uncached - done)
        if snap.num_running_reqs == 0 and snap.num_waiting_reqs == 0 and snap.num_waiting_uncached_tokens == 0:
            # An idle rank has prefilled everything it received. It receives at once when idle, so
            # only what was sent within RECV_SLACK_S of the snapshot (or after it) can be queued.
            # This bounds drift from mispredicted hits and from aborted requests. (A busy rank's
            # `waiting == 0` proves nothing: requests sent during a step are received after it.)
            exact = sum(u for t, u in self.recent if t > snap.timestamp - RECV_SLACK_S)
            if exact != self.queued_uncached:
                self.resyncs += 1
                self.queued_uncached = exact
        while self.recent and self.recent[0][0] <= snap.timestamp:
            self.recent.popleft()
        moments = getattr(snap, "decode_moments", None)
        if moments is not None and len(moments) >= 5 and all(isfinite(m) and m >= 0 for m in moments):
            self.decode_moments = tuple(moments)  # (a garbled one would poison the pooled sums for good)
        # requests the snapshot knew of, minus those still waiting: the ones whose outputs the
        # decode moments count (with `decode_moments`, the mean output length so far)
        self.decoders_seen = max(0, self.dispatched - len(self.recent) - snap.num_waiting_reqs)
        return True
