"""The kvmul routing state machine: exact per-rank cache mirrors + load ledgers + the LMetric rule.

This is the one implementation of the policy. The live controller feeds it SGLang's KV events and
load snapshots; the simulator feeds it simulated ones, both as the types of `events`. No I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from sglang_kvmul.core.block_hash import DEFAULT, CacheNamespace, first_page_hash
from sglang_kvmul.core.decode_cost import PooledDecodeCost, PooledOutputSpread
from sglang_kvmul.core.events import AllBlocksCleared, BlockRemoved, BlockStored, EventUpdate, KVEvent
from sglang_kvmul.core.load_ledger import LoadSnapshotView, RankLoad
from sglang_kvmul.core.mirror import RadixMirror
from sglang_kvmul.core.pending import PendingPrefixes
from sglang_kvmul.core.prefix import cached_tokens
from sglang_kvmul.core.radix_index import SharedRadixIndex
from sglang_kvmul.core.rules import Kvmul
from sglang_kvmul.core.score import pick_lowest_among
from sglang_kvmul.core.view import RankView, Rule


class NoRankAvailable(RuntimeError):
    """Every rank is down: the request cannot be served by this server."""


@dataclass
class Decision:
    """What the router saw and chose for one request."""

    rank: int
    prompt_len: int
    root_hash: int | None  # the prompt's first-page block hash in its cache namespace
    cached: list[int]  # tokens each rank would serve from cache (mirror or in-flight credit)
    from_pending: list[bool]  # whether that figure came from an unconfirmed in-flight prompt
    queued: list[int]
    batch: list[int]
    scores: list[float]  # the rule's cost per rank (lowest wins; finite)
    tie: bool = False  # the rotation chose among equally scored ranks
    excluded: tuple[int, ...] = ()  # ranks the rule ruled out before comparing scores

    @property
    def uncached(self) -> list[int]:
        return [self.prompt_len - c for c in self.cached]

    @property
    def predicted_cached(self) -> int:
        return self.cached[self.rank]


@dataclass
class RouterStats:
    decisions: int = 0
    unknown_events: int = 0
    clears: int = 0
    stale_marks: int = 0
    per_rank_requests: list[int] = field(default_factory=list)
    per_rank_prompt_tokens: list[int] = field(default_factory=list)
    per_rank_predicted_cached: list[int] = field(default_factory=list)
    last_scores: list[float] = field(default_factory=list)


class KvmulRouter:
    """Chooses a DP rank per request, by default with `(queued + uncached) * (batch + 1)`."""

    def __init__(
        self,
        num_ranks: int,
        page_size: int,
        dynamo_events: bool = False,
        rule: Rule | None = None,
        chunk_tokens: int = 0,
        mixed_chunk: bool = False,
    ) -> None:
        """`dynamo_events`: SGLang publishes in the "dynamo" format (hashes also cover extra_key).
        `rule`: the routing rule (`rules`, default kvmul); baselines share the same mirror and load view.
        `chunk_tokens`: the ranks' chunked_prefill_size (0: prompts are prefilled whole).
        `mixed_chunk`: the ranks run SGLang's --enable-mixed-chunk (decodes go on inside prefill steps)."""
        self.rule: Rule = rule if rule is not None else Kvmul()
        if num_ranks < 1:
            raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
        self.num_ranks = num_ranks
        self.page_size = page_size
        self.dynamo_events = dynamo_events
        if chunk_tokens < 0:
            raise ValueError(f"chunk_tokens must be >= 0 (0: unchunked), got {chunk_tokens}")
        self.chunk_tokens = chunk_tokens
        self.mixed_chunk = mixed_chunk
        self.index = SharedRadixIndex(num_ranks, page_size)  # one walk per request answers every rank
        self.mirrors = [RadixMirror(page_size, self.index, r) for r in range(num_ranks)]
        self.loads = [RankLoad() for _ in range(num_ranks)]
        # The ledgers' per-rank figures as plain lists, updated where a ledger changes (commit,
        # snapshot), so a decision copies four lists instead of reading 4 x ranks properties.
        self._queued, self._running = [0] * num_ranks, [0] * num_ranks
        self._waiting, self._kv = [0] * num_ranks, [0] * num_ranks
        self._batch = [0] * num_ranks  # running + waiting
        # capacities and speed, for rules that read them (kept current like the rest, not rebuilt per request)
        self._max_running, self._max_kv, self._speed = [0] * num_ranks, [0] * num_ranks, [0.0] * num_ranks
        self._fresh = [0] * num_ranks  # running requests not yet past their first token
        self.decode_cost = PooledDecodeCost(num_ranks)  # measured decode cost, pooled (`decode_cost`)
        self.output_spread = PooledOutputSpread(num_ranks)  # the finished outputs' spread, pooled
        self._pending_ranks: set[int] = set()  # ranks with in-flight prompts to credit
        self.pending = [PendingPrefixes() for _ in range(num_ranks)]
        # A stale rank lost KV events for good: its mirror is not trusted (scored as caching
        # nothing) until SGLang clears that cache (AllBlocksCleared) and the mirror restarts exact.
        self.stale = [False] * num_ranks
        # A down rank (its process exited, its socket stopped accepting) gets no more requests.
        self.down = [False] * num_ranks
        self.stats = RouterStats(
            per_rank_requests=[0] * num_ranks,
            per_rank_prompt_tokens=[0] * num_ranks,
            per_rank_predicted_cached=[0] * num_ranks,
            last_scores=[0.0] * num_ranks,
        )
        self._rotation = 0

    # ---- decisions -------------------------------------------------------------------------
    def root_hash(self, tokens: Sequence[int], namespace: CacheNamespace = DEFAULT) -> int | None:
        if len(tokens) < self.page_size:
            return None
        return first_page_hash(tokens, self.page_size, namespace, self.dynamo_events)

    def decide(self, tokens: Sequence[int], limit: int, namespace: CacheNamespace = DEFAULT) -> Decision:
        """Score every rank for a prompt; `limit` is the longest prefix the scheduler may reuse."""
        tokens = _as_tuple(tokens)
        n = len(tokens)
        root = self.root_hash(tokens, namespace)
        matches, stem = self.index.match_all_stem(tokens, root, limit)
        ps, stale, pending = self.page_size, self.stale, self.pending
        # match_all already caps at `limit` and floors to pages: only stale ranks need zeroing
        cached = [0 if st else m for m, st in zip(matches, stale, strict=True)] if True in stale else matches
        from_pending = [False] * self.num_ranks
        for r in sorted(self._pending_ranks):
            # in-flight prompts not yet confirmed by events: credit them as cache
            credit = cached_tokens(pending[r].match(tokens, root), limit, ps)
            if credit > cached[r]:
                cached[r], from_pending[r] = credit, True
        view = RankView(
            prompt_len=n,
            cached=cached,
            queued=self._queued[:],
            running=self._running[:],
            waiting=self._waiting[:],
            kv_tokens=self._kv[:],
            page_size=self.page_size,
            chunk_tokens=self.chunk_tokens,
            mixed_chunk=self.mixed_chunk,
            batch=self._batch[:],
            stem=stem,
        )
        if self.rule.reads_capacity:  # kept off the decisions of rules that do not read them
            view.max_running = self._max_running[:]
            view.max_kv_tokens = self._max_kv[:]
            view.prefill_us_per_token = self._speed[:]
            view.decode_tokens_per_request = self.decode_cost.tokens_per_request
            view.decode_batch_mean = self.decode_cost.batch_mean
            view.decode_output_tokens = self.decode_cost.output_tokens
            view.rank_slowdown = self.decode_cost.rank_slowdown
            view.fresh = self._fresh[:]
            view.fresh_pause_weight = self.output_spread.fresh_pause_weight
        c = self.rule.choose(view, self._rotation)
        rank, tie, excluded = c.rank, c.tie, c.excluded
        if self.down[rank]:  # the rule's own costs, among the ranks that are up (any rule, no special case)
            live = [not d and r not in excluded for r, d in enumerate(self.down)]
            if not any(live):
                live = [not d for d in self.down]
            if not any(live):
                raise NoRankAvailable("every DP rank is down")
            rank, tie = pick_lowest_among(c.costs, live, view.queued, self._rotation)
            excluded = tuple(r for r, ok in enumerate(live) if not ok)
        return Decision(rank, n, root, cached, from_pending, view.queued, view.batch, c.costs, tie, excluded)

    def set_down(self, rank: int) -> bool:
        """Take `rank` out of routing for good (a restarted rank comes back with a new server);
        True the first time."""
        first = not self.down[rank]
        self.down[rank] = True
        return first

    def commit(self, decision: Decision, tokens: Sequence[int], now: float) -> None:
        """Book a dispatched request on its rank (also used for requests pinned by the user)."""
        r = decision.rank
        load = self.loads[r]
        load.on_dispatch(now, decision.prompt_len - decision.cached[r], decision.prompt_len)
        self._sync(r)
        if len(tokens) > self.page_size:
            tokens = _as_tuple(tokens)  # what the index and the in-flight matching compare against
            self.pending[r].add(now, tokens, decision.root_hash, load.prefilled_seen + load.queued_uncached)
            self._pending_ranks.add(r)
        st = self.stats
        st.decisions += 1
        st.per_rank_requests[r] += 1
        st.per_rank_prompt_tokens[r] += decision.prompt_len
        st.per_rank_predicted_cached[r] += decision.cached[r]
        st.last_scores = decision.scores

    def route(self, tokens: Sequence[int], limit: int, now: float, namespace: CacheNamespace = DEFAULT) -> Decision:
        tokens = _as_tuple(tokens)
        decision = self.decide(tokens, limit, namespace)
        self.commit(decision, tokens, now)
        self._rotation += decision.tie  # only rule-made choices advance the tie rotation
        return decision

    def assign(
        self, rank: int, tokens: Sequence[int], limit: int, now: float, namespace: CacheNamespace = DEFAULT
    ) -> Decision:
        """Book a request whose rank was fixed elsewhere (pinned, sticky session)."""
        tokens = _as_tuple(tokens)
        decision = self.decide(tokens, limit, namespace)
        decision.rank, decision.tie = rank, False
        self.commit(decision, tokens, now)
        return decision

    # ---- inputs from the ranks -------------------------------------------------------------
    def apply_events(self, rank: int, events: Iterable[KVEvent]) -> None:
        """Apply one rank's KV events in order (dispatched on their type, `events`)."""
        mirror = self.mirrors[rank]
        for ev in events:
            kind = type(ev)
            if kind is BlockStored:
                mirror.store(ev.block_hashes, ev.parent_block_hash, ev.token_ids)  # orphans: mirror counts
            elif kind is BlockRemoved:
                mirror.remove(ev.block_hashes)
            elif kind is AllBlocksCleared:
                mirror.clear()
                self.stale[rank] = False
                self.stats.clears += 1
            else:
                self.stats.unknown_events += 1

    def apply_update(self, rank: int, update: EventUpdate) -> None:
        """What one message of a rank's stream means: a rebuild from full history, new batches, and
        whether events were lost for good before them (the mirror is then untrusted, also after a
        rebuild from a history that no longer starts at the first batch, until an AllBlocksCleared
        among the batches makes it exact again). The one path for live messages, replays and a late
        joiner's catch-up."""
        if update.rebuild:
            self.mirrors[rank].clear()
            self.stale[rank] = False
        if update.lost:
            self.mark_stale(rank)
        for batch in update.batches:
            self.apply_events(rank, batch.events)

    def mark_stale(self, rank: int) -> None:
        self.stale[rank] = True
        self.stats.stale_marks += 1

    def apply_snapshot(self, rank: int, snap: LoadSnapshotView, now: float) -> None:
        load = self.loads[rank]
        if not load.on_snapshot(snap):
            return
        self._sync(rank)
        self.decode_cost.update(
            rank, load.decode_moments, load.prefill_busy_us, load.prefilled_seen, load.decoders_seen
        )
        self.output_spread.update(rank, load.finished_outputs)
        mirror = self.mirrors[rank]
        ps = self.page_size

        def confirmed(tokens: Sequence[int], root: int | None) -> bool:
            limit = len(tokens) - 1
            return mirror.match(tokens, root, limit) >= limit - limit % ps

        self.pending[rank].prune(now, load.prefilled_seen, confirmed)
        if not self.pending[rank].entries:
            self._pending_ranks.discard(rank)

    def _sync(self, r: int) -> None:
        ld = self.loads[r]
        self._queued[r] = ld.queued_uncached
        self._running[r] = ld.running
        self._waiting[r] = ld.waiting
        self._batch[r] = ld.batch_size
        self._kv[r] = ld.kv_tokens
        self._max_running[r] = ld.max_running
        self._max_kv[r] = ld.max_kv_tokens
        self._speed[r] = ld.prefill_us_per_token
        self._fresh[r] = ld.fresh


def _as_tuple(tokens: Sequence[int]) -> tuple[int, ...]:
    """Prompts are compared as tuples (see `radix_index`): convert once per request (~1 ns/token),
    not once per use (match, in-flight credit, snapshot-time confirmation)."""
    return tokens if type(tokens) is tuple else tuple(tokens)
