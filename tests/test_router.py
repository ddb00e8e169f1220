"""The router driven by SGLang's own events (through the wire format) and snapshot classes (no server)."""

import random

import pytest
from helpers import via_wire
from sglang.srt.disaggregation.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
from sglang.srt.managers.load_snapshot import LoadSnapshot

from sglang_kvmul.core import events as core_events
from sglang_kvmul.core.block_hash import CacheNamespace, first_page_hash
from sglang_kvmul.core.events import EventUpdate, KVEventBatch
from sglang_kvmul.core.load_ledger import RankLoad
from sglang_kvmul.core.prefix import common_prefix_len
from sglang_kvmul.core.router import KvmulRouter
from sglang_kvmul.core.rules import DEFAULT_RULE, rule_by_name


def stored(tokens, salt=None, first_hash=1000):
    """A root-level BlockStored for `tokens` (page size 1), with SGLang's first-page hash."""
    ns = CacheNamespace(salt)
    hashes = [first_page_hash(tokens, 1, ns), *list(range(first_hash, first_hash + len(tokens) - 1))]
    return BlockStored(
        block_hashes=hashes, parent_block_hash=None, token_ids=tokens, block_size=1, lora_id=None, cache_salt=salt
    )


def feed(r: KvmulRouter, rank: int, *events) -> None:
    r.apply_events(rank, via_wire(events))


def snap(t, running=0, waiting=0, waiting_uncached=0, prefilled=0):
    return LoadSnapshot(
        timestamp=t,
        num_running_reqs=running,
        num_waiting_reqs=waiting,
        num_waiting_uncached_tokens=waiting_uncached,
        total_prefill_uncached_tokens=prefilled,
    )


PREFIX = list(range(100, 200))


def test_request_goes_to_the_rank_holding_its_prefix():
    r = KvmulRouter(num_ranks=3, page_size=1)
    feed(r, 2, stored(PREFIX))
    d = r.route([*PREFIX, 1, 2, 3], limit=102, now=1.0)
    assert d.rank == 2
    assert d.cached == [0, 0, 100]
    assert d.uncached == [103, 103, 3]


def test_cached_prediction_respects_len_minus_one_and_pages():
    r = KvmulRouter(num_ranks=1, page_size=4)
    first = first_page_hash(list(range(4)), 4)
    ev = BlockStored(
        block_hashes=[first, 2], parent_block_hash=None, token_ids=list(range(8)), block_size=4, lora_id=None
    )
    feed(r, 0, ev)
    # whole prompt cached: the last token is recomputed, and 7 floors to one page
    assert r.decide(list(range(8)), limit=7).cached == [4]
    assert r.decide(list(range(9)), limit=8).cached == [8]


def test_removed_and_cleared_blocks_stop_counting():
    r = KvmulRouter(num_ranks=1, page_size=1)
    ev = stored([5, 6, 7])
    feed(r, 0, ev, BlockRemoved(block_hashes=[ev.block_hashes[2]]))
    assert r.decide([5, 6, 7, 8], limit=3).cached == [2]
    feed(r, 0, AllBlocksCleared())
    assert r.decide([5, 6, 7, 8], limit=3).cached == [0]
    assert r.stats.clears == 1


def test_salted_blocks_only_serve_the_same_salt():
    r = KvmulRouter(num_ranks=2, page_size=1)
    feed(r, 1, stored([5, 6, 7], salt="tenant-a"))
    assert r.decide([5, 6, 7, 8], limit=3).cached == [0, 0]
    assert r.decide([5, 6, 7, 8], limit=3, namespace=CacheNamespace("tenant-a")).cached == [0, 3]


def test_burst_spreads_by_load_and_siblings_follow_in_flight_prompts():
    r = KvmulRouter(num_ranks=2, page_size=1)
    a = [r.route(list(range(1000 * g, 1000 * g + 300)), limit=299, now=1.0).rank for g in range(2)]
    assert sorted(a) == [0, 1]  # two cold groups: the second sees the first one's queued work
    # a sibling of group 0 arrives before any KV event: the in-flight credit keeps it together
    d = r.route([*list(range(0, 300)), 7], limit=300, now=1.1)
    assert d.rank == a[0] and d.from_pending[a[0]] and d.cached[a[0]] == 300


def test_snapshot_drains_queue_and_resets_batch():
    r = KvmulRouter(num_ranks=2, page_size=1)
    r.route(list(range(500)), limit=499, now=10.0)
    rank = r.stats.per_rank_requests.index(1)
    assert r.loads[rank].queued_uncached == 500 and r.loads[rank].batch_size == 1
    r.apply_snapshot(rank, snap(10.5, running=1, prefilled=500), now=10.5)
    assert r.loads[rank].queued_uncached == 0 and r.loads[rank].batch_size == 1
    assert len(r.pending[rank]) == 0  # prefilled and not in the mirror: the blocks are gone, credit retired
    r.apply_snapshot(rank, snap(11.0), now=11.0)
    assert r.loads[rank].batch_size == 0


def test_busy_snapshot_keeps_requests_the_scheduler_has_not_received():
    """A scheduler receives only between steps: `waiting == 0` during a step proves nothing."""
    r = KvmulRouter(num_ranks=1, page_size=1)
    r.route(list(range(300)), limit=299, now=10.0)
    r.route(list(range(1000, 1400)), limit=399, now=10.1)
    # a step that prefilled the first prompt ends; the second is still in the socket
    r.apply_snapshot(0, snap(10.2, running=1, prefilled=300), now=10.2)
    assert r.loads[0].queued_uncached == 400
    assert len(r.pending[0]) == 1  # the unprefilled prompt keeps its in-flight credit
    assert r.decide([*list(range(1000, 1400)), 5], limit=400).cached == [400]


def test_ledger_resyncs_only_when_the_rank_is_idle():
    ld = RankLoad()
    ld.on_dispatch(1.0, 1000)  # predicted a miss; the scheduler found it cached and prefilled only 10
    ld.on_snapshot(snap(1.2, running=1, prefilled=10))
    assert ld.queued_uncached == 990 and ld.resyncs == 0
    ld.on_dispatch(1.3, 50)
    ld.on_snapshot(snap(1.4, prefilled=60))  # idle: everything it received is prefilled
    assert ld.resyncs == 1 and ld.queued_uncached == 0
    ld.on_dispatch(1.5, 70)
    assert ld.queued_uncached == 70
    assert not ld.on_snapshot(snap(1.4))  # stale snapshots are ignored


def test_common_prefix_len():
    assert common_prefix_len([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix_len([], [1]) == 0
    assert common_prefix_len([1, 2], [1, 2, 3]) == 2


def test_pinned_requests_do_not_disturb_the_tie_rotation():
    r = KvmulRouter(num_ranks=2, page_size=1)
    first = r.route([7], limit=0, now=1.0).rank  # both ranks idle and empty: a tie
    r.apply_snapshot(first, snap(1.5), now=1.5)  # it finished: both ranks idle again
    for _ in range(3):
        r.assign(first, [9], limit=0, now=1.6)  # pinned: booked, but not a rule-made choice
    r.apply_snapshot(first, snap(1.7), now=1.7)
    assert r.route([8], limit=0, now=2.0).rank == 1 - first  # the next tie still alternates


def test_common_prefix_len_finds_the_first_difference_anywhere():
    rng = random.Random(5)
    a = [rng.randrange(3) for _ in range(20000)]
    for cut in (0, 1, 255, 256, 257, 5000, 19999):
        b = [*a[:cut], 7, *a[cut + 1 :]]
        assert common_prefix_len(a, b) == cut
        assert common_prefix_len([9, *a], b, start=1) == cut
    assert common_prefix_len(a, a) == 20000
    assert common_prefix_len(a, a[100:], 100, 150) == 50


def test_sglang_events_decode_into_the_core_types_field_for_field():
    ev = stored([5, 6, 7], salt="tenant-a")
    (got,) = via_wire([ev])
    assert type(got) is core_events.BlockStored
    assert (got.block_hashes, got.parent_block_hash, got.token_ids) == (ev.block_hashes, None, [5, 6, 7])
    removed, cleared = via_wire([BlockRemoved(block_hashes=[1, 2], medium="GPU"), AllBlocksCleared()])
    assert type(removed) is core_events.BlockRemoved and removed.block_hashes == [1, 2]
    assert type(cleared) is core_events.AllBlocksCleared


def test_events_are_dispatched_by_type_and_strangers_are_counted():
    r = KvmulRouter(num_ranks=1, page_size=1)
    r.apply_events(0, [stored([5, 6, 7])])  # SGLang's own object, not decoded: not a core event
    assert r.stats.unknown_events == 1 and r.decide([5, 6, 7, 8], limit=3).cached == [0]


def test_an_update_that_lost_events_leaves_the_rank_stale_also_after_a_rebuild():
    r = KvmulRouter(num_ranks=1, page_size=1)
    history = KVEventBatch(0.0, via_wire([stored([5, 6, 7])]))
    r.apply_update(0, EventUpdate([history], rebuild=True, lost=True))  # replay no longer starts at seq 0
    assert r.stale == [True] and r.decide([5, 6, 7, 8], limit=3).cached == [0]
    cleared = KVEventBatch(1.0, via_wire([AllBlocksCleared(), stored([5, 6, 7])]))
    r.apply_update(0, EventUpdate([cleared], lost=True))  # a gap, then the cache was cleared: exact again
    assert r.stale == [False] and r.decide([5, 6, 7, 8], limit=3).cached == [3]


def test_snapshot_capacity_reaches_the_default_rule():
    # SGLang's own LoadSnapshot: rank 0 holds the prefix but is at max_running_requests, rank 1 has
    # room; the default rule (which reads capacity) leaves rank 0, the product (which does not) keeps it
    def capped_snap(t: float, running: int) -> LoadSnapshot:
        return LoadSnapshot(timestamp=t, num_running_reqs=running, max_running_requests=8)

    routers = {name: KvmulRouter(num_ranks=2, page_size=1, rule=rule_by_name(name)) for name in (DEFAULT_RULE, "kvmul")}
    for r in routers.values():
        feed(r, 0, stored(PREFIX))
        for rank, running in ((0, 8), (1, 1)):
            r.apply_snapshot(rank, capped_snap(1.0, running), now=1.0)
    prompt = [*PREFIX, 7]
    assert routers["kvmul"].decide(prompt, limit=100).rank == 0  # 1 * 9 < 101 * 2
    d = routers[DEFAULT_RULE].decide(prompt, limit=100)
    assert (d.rank, d.excluded) == (1, (0,))
    # the cap is lifted by the next snapshot: the prefix wins again
    routers[DEFAULT_RULE].apply_snapshot(0, capped_snap(2.0, 7), now=2.0)
    assert routers[DEFAULT_RULE].decide(prompt, limit=100).rank == 0


def test_sglang_decode_moments_reach_marginal_decode():
    # SGLang's own LoadSnapshot with decode step-time moments: 300 steps at batch 2 take 1,200 us and
    # 300 at batch 6 take 2,000 us (slope 200 us per request); prefill 100 us per token; 12 requests
    # past prefill over 2,400 request-steps (200 steps each). One more request in a batch then costs
    # 200 us * 200 steps / 100 us = 400 prefill tokens.
    pts = [(2, 1200.0)] * 300 + [(6, 2000.0)] * 300
    moments = [len(pts), sum(b for b, _ in pts), sum(t for _, t in pts), sum(b * b for b, _ in pts),
               sum(b * t for b, t in pts), sum(b for b, _ in pts)]  # fmt: skip
    routers = {
        name: KvmulRouter(num_ranks=2, page_size=1, rule=rule_by_name(name))
        for name in ("marginal_decode", "marginal_rebalance", "marginal_bounded", "marginal_turnover")
    }
    for r in routers.values():
        feed(r, 0, stored(PREFIX))
        for rank in (0, 1):
            for _ in range(6):
                r.assign(rank, [1, 2, 3], limit=2, now=0.5)  # the ledger counts the requests it sent
            r.apply_snapshot(rank, LoadSnapshot(
                timestamp=1.0, num_running_reqs=4 if rank == 0 else 0, total_prefill_uncached_tokens=100_000,
                total_prefill_busy_us=10_000_000, decode_moments=moments if rank == 0 else None,
            ), now=1.0)  # fmt: skip
    dc = routers["marginal_decode"].decode_cost
    assert (dc.slope_us, dc.prefill_us_per_token, dc.steps_per_request) == (200.0, 100.0, 200.0)
    assert dc.tokens_per_request == 400.0
    prompt = [*PREFIX, 7]
    # rank 0 holds 100 of the 101 tokens and runs 4: 1 * 5 + 4 * 400 against rank 1's 101 * 1
    d = routers["marginal_decode"].decide(prompt, limit=100)
    assert (d.rank, d.scores) == (1, [1605, 101])
    assert routers["marginal_bounded"].decide(prompt, limit=100).rank == 0  # no decode term: 5 < 101
    # 4 requests per decode step on average (half the steps at 2, half at 6): D over 2 arrival intervals
    assert routers["marginal_rebalance"].decode_cost.batch_mean == 4.0
    assert routers["marginal_rebalance"].decide(prompt, limit=100).scores == [5 + 4 * 400 * 2 / 4, 101]
    # one output in wall time: 200 steps of (960,000 us of decode steps + both ranks' 20 s of prefill)
    # / 600 steps, at 100 us per prefill token
    assert dc.output_tokens == pytest.approx(200 * (960_000 + 20_000_000) / 600 / 100)
    # no queue on either rank: the batch it meets is the batch now, as marginal_rebalance prices it
    turnover = routers["marginal_turnover"].decide(prompt, limit=100).scores
    assert turnover == pytest.approx([5 + 4 * 400 * 2 / 4, 101 + 0])


def test_chunk_size_reaches_the_rules_and_bounds_a_long_prompts_queue():
    # SGLang's own LoadSnapshot: rank 0 runs 10 with nothing queued; rank 1 was just sent a request
    # with 12,000 uncached tokens (the ledger counts it as waiting, queued). A cold 20,000-token
    # prompt: marginal_turnover queues it on rank 1; with the ranks' 4,096-token chunks,
    # marginal_chunked does not (rank 1's wait 32,000 > 20,000 + one chunk + the mean queued 6,000)
    routers = {
        (name, chunk): KvmulRouter(num_ranks=2, page_size=1, rule=rule_by_name(name), chunk_tokens=chunk)
        for name in ("marginal_turnover", "marginal_chunked")
        for chunk in (0, 4096)
    }
    prompt = list(range(20_000))
    for (name, chunk), r in routers.items():
        assert r.chunk_tokens == chunk
        r.apply_snapshot(0, snap(1.0, running=10), now=1.0)
        r.assign(1, list(range(100_000, 112_000)), limit=11_999, now=1.5)
        d = r.decide(prompt, limit=len(prompt) - 1)
        assert d.rank == (0 if (name, chunk) == ("marginal_chunked", 4096) else 1), (name, chunk)
    with pytest.raises(ValueError, match="chunk_tokens"):
        KvmulRouter(num_ranks=2, page_size=1, chunk_tokens=-1)
