"""The event loop: arrivals routed by the production router, ranks stepping, events and load snapshots
reaching the router after a configurable delay (SGLang publishes them over ZMQ).

A rank's uninterrupted decode steps run as one block (see `rank.py`); the one thing the router
sees differently is that a block publishes its snapshot at its end, not every 8th step, so between
finishes a rank's reported KV tokens lag by the tokens decoded since (running and waiting counts
and queued prefill do not change inside a block).

With `shared_cores` (the CPU test server's ranks share two cores) every step runs one at a time and
progresses at its rate alone over `SharedCores.slowdown`: whenever a rank starts or ends a step, the
others' steps in flight are re-timed (processor sharing over what each has left)."""

from __future__ import annotations

import gc
import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field

from sglang_kvmul.core.load_ledger import LoadSnapshotView
from sglang_kvmul.core.router import KvmulRouter
from sglang_kvmul.core.rules import DEFAULT_RULE, rule_by_name
from sglang_kvmul.sim.cost import CostModel, LinearCost, ScaledCost, SharedCores
from sglang_kvmul.sim.rank import RankConfig, SimRank, SimRequest
from sglang_kvmul.sim.workloads import TraceRequest

SNAPSHOT_EVERY_DECODES = 8


@dataclass
class SimConfig:
    ranks: int = 4
    rank: RankConfig = field(default_factory=RankConfig)
    rule: str = DEFAULT_RULE  # any `core.rules.REGISTRY` spelling
    event_delay_s: float = 0.002  # KV events and load snapshots reach the router this much later
    fuse_decode: bool = True  # take uninterruptible decode runs as one block (same timeline, faster)
    shared_cores: SharedCores | None = None  # ranks slow each other down (CPU); steps are not fused


@dataclass
class _Share:
    """A step in flight on shared cores: its time alone, how much of it is left, at what rate."""

    started: float
    nominal: float
    left: float
    since: float
    rate: float | None = None  # None until `_retime` has timed it


class Simulation:
    def __init__(self, cfg: SimConfig, cost: CostModel | None = None, speeds: Sequence[float] | None = None) -> None:
        """`speeds`: per-rank speed factors (a mixed fleet)."""
        self.cfg = cfg
        cost = cost or LinearCost()
        speeds = speeds or [1.0] * cfg.ranks
        if len(speeds) != cfg.ranks:
            raise ValueError(f"{len(speeds)} speeds for {cfg.ranks} ranks")
        self.ranks = [SimRank(r, cfg.rank, cost if s == 1.0 else ScaledCost(cost, s)) for r, s in enumerate(speeds)]
        self.router = KvmulRouter(
            cfg.ranks,
            cfg.rank.page_size,
            rule=rule_by_name(cfg.rule),
            chunk_tokens=cfg.rank.chunk_tokens,
            mixed_chunk=cfg.rank.mixed_chunk,
        )
        self._heap: list[tuple[float, int, str, object]] = []
        self._seq = 0
        self._share: dict[int, _Share] = {}  # shared cores: each step in flight
        self.step_events = 0  # steps or fused decode blocks processed

    def _push(self, t: float, kind: str, payload: object) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, payload))

    def _publish(self, rank: SimRank, now: float, snapshot: bool = True) -> None:
        events = rank.cache.take_events()
        if events:
            self._push(now + self.cfg.event_delay_s, "events", (rank.rank, events))
        if snapshot:
            self._push(now + self.cfg.event_delay_s, "snapshot", (rank.rank, LoadSnapshotView(**rank.snapshot(now))))

    def _kick(self, rank: SimRank, now: float) -> None:
        fused = self.cfg.fuse_decode and self.cfg.shared_cores is None
        end = rank.start_step(now, float("inf") if fused else now)
        if end is not None:
            if self.cfg.shared_cores is None:
                self._push(end, "step", (rank, rank.version))
            else:  # timed by `_retime`, once every rank's state at `now` is known
                self._share[rank.rank] = _Share(now, end - now, end - now, now)
        if rank.cache.events:  # admission evicted pages
            self._publish(rank, now, snapshot=False)

    def _retime(self, now: float) -> None:
        """Shared cores: set every step in flight to its rate under the other ranks' steps now."""
        cores = self.cfg.shared_cores
        if cores is None:
            return
        busy = [r for r in self.ranks if r.busy_until is not None]
        prefilling = sum(not r.decoding for r in busy)
        for r in busy:
            share = self._share[r.rank]
            own = not r.decoding
            rate = 1.0 / cores.slowdown(own, prefilling - own, len(busy) - 1 - (prefilling - own))
            if share.rate == rate:
                continue
            if share.rate is not None:  # already timed: what it did at the old rate is done
                share.left -= (now - share.since) * share.rate
                r.version += 1  # its queued end is void
            share.since, share.rate = now, rate
            r.busy_until = now + share.left / rate
            self._push(r.busy_until, "step", (r, r.version))

    def run(self, workload: Sequence[TraceRequest]) -> list[SimRequest]:
        """Simulate `workload` to the end; returns every request with its timeline. The cyclic
        garbage collector is off meanwhile: a long run holds millions of cache pages and requests
        (parent/child links, no cyclic garbage: evicted pages are freed by reference counting), and
        its full collections rescanned them all, ~30% of the run."""
        enabled = gc.isenabled()
        gc.disable()
        try:
            return self._run(workload)
        finally:
            if enabled:
                gc.enable()

    def _run(self, workload: Sequence[TraceRequest]) -> list[SimRequest]:
        reqs = [SimRequest(i, w.arrival, tuple(w.input_ids), max(1, w.output_len)) for i, w in enumerate(workload)]
        arrivals = sorted(reqs, key=lambda r: r.arrival)
        nxt, heap = 0, self._heap
        while heap or nxt < len(arrivals):
            # an arrival goes before any other event at the same instant
            if nxt < len(arrivals) and (not heap or arrivals[nxt].arrival <= heap[0][0]):
                req = arrivals[nxt]
                nxt += 1
                now = req.arrival
                d = self.router.route(req.tokens, len(req.tokens) - 1, now)
                req.rank, req.predicted_cached, req.best_cached = d.rank, d.predicted_cached, max(d.cached)
                rank = self.ranks[d.rank]
                rank.enqueue(req, now)
                end = rank.interrupt(now)
                if end is not None:
                    self._push(end, "step", (rank, rank.version))
                self._kick(rank, now)
                self._retime(now)
                continue
            now, _, kind, payload = heapq.heappop(heap)
            if kind == "step":
                rank, version = payload
                if version != rank.version:
                    continue  # a decode block that an arrival cut short: its new end is queued
                self.step_events += 1
                decoded, before = rank.decoding, rank.steps
                rank.steps += rank.block_steps if decoded else 1
                if self.cfg.shared_cores is not None:
                    share = self._share.pop(rank.rank)
                    if not decoded:  # SGLang times its prefill busy on the clock
                        rank.prefill_busy_s += (now - share.started) - share.nominal
                rank.finish_step(now)
                self._kick(rank, now)
                self._retime(now)
                # SGLang publishes a load snapshot after each prefill batch, every few decode
                # batches, and when idle
                busy = rank.busy_until is not None
                every = rank.steps // SNAPSHOT_EVERY_DECODES != before // SNAPSHOT_EVERY_DECODES
                self._publish(rank, now, not decoded or not busy or every)
            elif kind == "events":
                r, events = payload
                self.router.apply_events(r, events)
            else:
                r, snap = payload
                self.router.apply_snapshot(r, snap, now)
        unfinished = [r.rid for r in reqs if r.finish is None]
        if unfinished:
            raise RuntimeError(f"{len(unfinished)} requests never finished (first: {unfinished[:5]})")
        return reqs
