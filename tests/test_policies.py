"""The baseline rules, each checked against its published definition on hand-made views."""

import dataclasses
from collections import Counter

import pytest
from helpers import view

from sglang_kvmul.core.router import KvmulRouter
from sglang_kvmul.core.rules import DEFAULT_RULE, REGISTRY, rule_by_name, rule_help


def pick(name, v, rotation=0):
    return rule_by_name(name).choose(v, rotation).rank


def test_kvmul_is_the_product_rule():
    assert pick("kvmul", view(cached=(900, 0), running=(3, 0))) == 0  # 100*4 < 1000*1
    tied = view(cached=(900, 0), running=(9, 0))  # 100*10 == 1000*1, equal queues: rotation decides
    assert {pick("kvmul", tied, rotation=0), pick("kvmul", tied, rotation=1)} == {0, 1}
    assert pick("kvmul", view(cached=(900, 0), running=(10, 0))) == 1


def test_marginal_latency_counts_the_queue_once_and_the_prefill_once_per_request_it_pauses():
    # the docstring's case: both ranks backlogged (20000 queued tokens), the cached one with two
    # more requests in its batch; a 4000-token prompt cached on rank 0 up to its last 100 tokens
    backlogged = view(cached=(3900, 0), queued=(20000, 20000), running=(10, 8), prompt=4000)
    assert pick("kvmul", backlogged) == 1  # (20000 + 100) * 11 > (20000 + 4000) * 9: re-prefill it
    assert pick("marginal_latency", backlogged) == 0  # 20000 + 100 * 11 < 20000 + 4000 * 9: keep it
    # idle ranks: the prefill pauses everything running there; 100 tokens over 51 requests cost
    # more than 4000 tokens over none
    busy = view(cached=(3900, 0), running=(50, 0), prompt=4000)
    assert rule_by_name("marginal_latency").costs(busy) == [100 * 51, 4000]
    assert pick("marginal_latency", busy) == 1
    assert pick("marginal_latency", view(cached=(3900, 0), running=(30, 0), prompt=4000)) == 0  # 3100 < 4000


def test_marginal_capped_leaves_a_rank_that_cannot_start_the_request():
    # rank 0 holds the prefix but its batch is at SGLang's max_running_requests: the request would
    # wait there for a slot, so it goes to the best rank that can start it
    hot = view(cached=(3900, 0, 0), running=(8, 2, 1), max_running=(8, 8, 8), prompt=4000)
    assert pick("marginal_latency", hot) == 0
    choice = rule_by_name("marginal_capped").choose(hot, 0)
    assert (choice.rank, choice.excluded) == (2, (0,))
    # no KV room on rank 0 (9950 of 10000 tokens held, 100 more needed): the short wait for pages
    # beats re-prefilling 3900 tokens elsewhere
    full = view(cached=(3900, 0), kv=(9950, 0), max_kv=(10000, 10000), prompt=4000)
    assert pick("marginal_capped", full) == 0
    # every rank at its cap: plain marginal latency, nothing excluded
    capped = view(cached=(3900, 0), running=(8, 8), max_running=(8, 8), prompt=4000)
    assert rule_by_name("marginal_capped").choose(capped, 0).excluded == ()
    assert pick("marginal_capped", capped) == 0


def test_marginal_capped_keeps_a_full_rank_when_every_free_rank_has_more_queued():
    # overload: rank 0 at its cap with 1000 tokens queued, rank 1 below it with 50000 (few long
    # prompts): the cap must not send everyone into the longest queue
    long_queue = view(cached=(0, 0), queued=(1000, 50000), running=(8, 1), max_running=(8, 8))
    choice = rule_by_name("marginal_capped").choose(long_queue, 0)
    assert (choice.rank, choice.excluded) == (0, ())  # 1000 + 1000 * 9 < 50000 + 1000 * 2
    short_queue = view(cached=(0, 0), queued=(1000, 500), running=(8, 1), max_running=(8, 8))
    choice = rule_by_name("marginal_capped").choose(short_queue, 0)
    assert (choice.rank, choice.excluded) == (1, (0,))
    # a rank that has not reported its cap yet (0) counts as having room
    unreported = view(cached=(0, 0), queued=(1000, 500), running=(8, 30), max_running=(8, 0))
    choice = rule_by_name("marginal_capped").choose(unreported, 0)
    assert (choice.rank, choice.excluded) == (1, (0,))


def test_marginal_bounded_lets_no_request_wait_more_than_a_prompt_and_the_mean_backlog_extra():
    # 1000 uncached tokens everywhere; rank 0 has a queue and no batch, ranks 1 and 2 none and 50
    # running: the sum of latencies prefers the queue (5000 + 1000 < 1000 * 51); the bound does
    # not: own wait 6000 > shortest 1000 + prompt 1000 + mean queued 5000 / 3
    isolated = view(cached=(0, 0, 0), queued=(5000, 0, 0), running=(0, 50, 50))
    assert pick("marginal_capped", isolated) == 0
    choice = rule_by_name("marginal_bounded").choose(isolated, 0)
    assert choice.rank in (1, 2) and choice.excluded == (0,)
    # within the slack (1200 + 1000 <= 1000 + 1000 + 400): the sum decides again
    assert pick("marginal_bounded", view(cached=(0, 0, 0), queued=(1200, 0, 0), running=(0, 50, 50))) == 0
    # a cached prefix stays while its own wait there is within the slack (1600 <= 2500; 3400 > 3100)
    assert pick("marginal_bounded", view(cached=(900, 0, 0), queued=(1500, 0, 0), running=(0, 50, 50))) == 0
    assert pick("marginal_bounded", view(cached=(900, 0, 0), queued=(3300, 0, 0), running=(0, 50, 50))) != 0
    # every rank backlogged alike: the slack grows with the backlog, so the sum keeps its choice
    congested = view(cached=(0, 0, 0), queued=(60000, 50000, 50000), running=(0, 50, 50))
    assert pick("marginal_bounded", congested) == pick("marginal_capped", congested) == 0


def test_kvmul_excess_is_the_product_on_queues_above_the_shortest():
    idle_somewhere = view(cached=(900, 0, 0), queued=(500, 0, 100), running=(3, 0, 1))
    assert rule_by_name("kvmul_excess").costs(idle_somewhere) == rule_by_name("kvmul").costs(idle_somewhere)
    # all backlogged by 20000 tokens: the common backlog moves nothing, the product moves the request
    backlogged = view(cached=(3900, 0), queued=(20000, 20000), running=(10, 8), prompt=4000)
    assert rule_by_name("kvmul_excess").costs(backlogged) == [100 * 11, 4000 * 9]
    assert (pick("kvmul", backlogged), pick("kvmul_excess", backlogged)) == (1, 0)


def test_cache_only_and_load_only():
    assert pick("cache_only", view(cached=(10, 900), running=(0, 50))) == 1
    assert pick("load_only", view(cached=(10, 900), running=(0, 50))) == 0


def test_vllm_v1_weights_waiting_four_times():
    # rank 0: 4*2 + 0 = 8; rank 1: 4*0 + 7 = 7
    assert pick("vllm_v1", view(cached=(0, 0), running=(0, 7), waiting=(2, 0))) == 1
    assert pick("vllm_v1", view(cached=(0, 0), running=(0, 9), waiting=(2, 0))) == 0


def test_linear_alpha_trades_normalised_cache_and_load():
    v = view(cached=(800, 0), running=(4, 1))
    assert pick("linear:1", v) == 0 and pick("linear:0", v) == 1
    # alpha 0.5: 0.5*0.2 + 0.5*1.0 = 0.6 vs 0.5*1.0 + 0.5*0.25 = 0.625
    assert pick("linear:0.5", v) == 0
    with pytest.raises(ValueError, match=r"alpha in \[0, 1\], got 1.5"):
        rule_by_name("linear:1.5")
    with pytest.raises(ValueError, match="needs a number in \\[0, 1\\], got 'abc'"):
        rule_by_name("linear:abc")
    with pytest.raises(ValueError, match="needs an argument"):
        rule_by_name("linear")
    assert rule_by_name("linear:0.25").name == "linear:0.25"


def test_dynamo_cost_credits_overlap_and_charges_decode_blocks():
    # prompt 1000: rank 0 has 600 cached but 900 KV tokens active; rank 1 is cold and empty.
    # rank 0: (0 + 1000 - 600) + 900 + 1000 = 2300; rank 1: 1000 + 0 + 1000 = 2000
    assert pick("dynamo", view(cached=(600, 0), kv=(900, 0))) == 1
    assert pick("dynamo", view(cached=(600, 0), kv=(200, 0))) == 0
    costs = rule_by_name("dynamo").choose(view(cached=(64, 0), kv=(0, 0), prompt=128, page=16), 0).costs
    assert costs == [(8 - 4) + 0 + 8, 8 + 0 + 8]


def test_tuned_spellings_weight_dynamos_prefill_and_marginal_decodes_decode_cost():
    """`dynamo:<w>` and `marginal_decode:<scale>` (sim_frontier's tuned family); the bare names stay
    the rules as shipped."""
    v = view(cached=(600, 0), kv=(900, 0))  # rank 0: prefill 400 blocks + decode 900; rank 1: 1000 + 0
    assert rule_by_name("dynamo").choose(v, 0).costs == [400 + 900 + 1000, 1000 + 0 + 1000]
    assert rule_by_name("dynamo:4").choose(v, 0).costs == [4 * 400 + 900 + 1000, 4 * 1000 + 0 + 1000]
    assert pick("dynamo", v) == 1 and pick("dynamo:4", v) == 0
    assert [rule_by_name(t).name for t in ("dynamo", "dynamo:1", "dynamo:0.5")] == ["dynamo", "dynamo", "dynamo:0.5"]
    # marginal_decode adds D * batch; scaled, scale * D * batch
    d = view(cached=(1000, 900), running=(4, 0))
    d = dataclasses.replace(d, decode_tokens_per_request=50.0)
    assert rule_by_name("marginal_decode").costs(d) == [0 + 4 * 50, 100 * 1 + 0]
    assert rule_by_name("marginal_decode:0.25").costs(d) == [0 + 4 * 50 * 0.25, 100 * 1 + 0]
    assert pick("marginal_decode", d) == 1 and pick("marginal_decode:0.25", d) == 0
    assert rule_by_name("marginal_decode:1").name == "marginal_decode"
    bad_args = [
        ("dynamo:-1", "weight >= 0, got -1"),
        ("marginal_decode:x", "number >= 0, got 'x'"),
        ("dynamo:inf", "number >= 0, got 'inf'"),
        ("marginal_decode:nan", "number >= 0, got 'nan'"),
    ]
    for bad, msg in bad_args:
        with pytest.raises(ValueError, match=msg):
            rule_by_name(bad)
    assert "dynamo[:<weight>]" in rule_help() and "marginal_decode[:<scale>]" in rule_help()


def test_marginal_rebalance_counts_the_decode_cost_for_one_arrival_interval():
    """D x min(1, 2 / mean batch): the full decode cost at batches of one or two, an eighth at 16."""
    v = dataclasses.replace(view(cached=(1000, 900), running=(4, 0)), decode_tokens_per_request=50.0)
    busy = dataclasses.replace(v, decode_batch_mean=16.0)
    assert rule_by_name("marginal_rebalance").costs(busy) == [0 + 4 * 50 * 2 / 16, 100 * 1 + 0]
    assert pick("marginal_rebalance", busy) == 0 and pick("marginal_decode", busy) == 1
    for light in (dataclasses.replace(v, decode_batch_mean=1.5), v):  # <= 2 requests, or not measured yet
        assert rule_by_name("marginal_rebalance").costs(light) == rule_by_name("marginal_decode").costs(light)


def test_marginal_turnover_prices_the_batch_a_request_will_meet_after_its_queue():
    """A cold 4000-token prompt: rank 0 has 20000 tokens queued and 1 request, rank 1 8000 and 9.
    By the time it starts on a rank, a fraction max(0, 1 - queued / L) of the batch there is left,
    and the rest is the mean batch (5)."""
    v = view(cached=(0, 0), queued=(20000, 8000), running=(1, 9), prompt=4000)
    assert rule_by_name("marginal_turnover").costs(v) == rule_by_name("marginal_rebalance").costs(v)  # L unmeasured
    assert pick("marginal_rebalance", v) == 0  # 20000 + 4000 * 2 < 8000 + 4000 * 10
    half = dataclasses.replace(v, decode_output_tokens=40000.0)  # batches met: 5 - 0.5 * 4 and 5 + 0.8 * 4
    assert rule_by_name("marginal_turnover").costs(half) == pytest.approx([20000 + 4000 * 4, 8000 + 4000 * 9.2])
    assert pick("marginal_turnover", half) == 0
    gone = dataclasses.replace(v, decode_output_tokens=20000.0)  # rank 0's queue outlasts every output there
    assert rule_by_name("marginal_turnover").costs(gone) == pytest.approx([20000 + 4000 * 6, 8000 + 4000 * 8.4])
    assert pick("marginal_turnover", gone) == 1
    # the decode term counts the same batches: D = 100 per request
    d = dataclasses.replace(gone, decode_tokens_per_request=100.0)
    assert rule_by_name("marginal_turnover").costs(d) == pytest.approx([44000 + 100 * 5, 41600 + 100 * 7.4])


def test_marginal_chunked_bounds_a_long_prompts_extra_wait_by_one_chunk_past_its_cached_prefix():
    """A cold 20000-token prompt: rank 0 runs 10 and has no queue, rank 1 runs none behind 12000
    queued tokens. The sum of latencies queues it on rank 1 (12000 + 20000 < 20000 * 11), and the
    prompt-long slack of `marginal_turnover` lets it (32000 <= 20000 + 20000 + 6000); one 4096-token
    chunk of slack does not (32000 > 20000 + 4096 + 6000)."""
    cold = dataclasses.replace(view(cached=(0, 0), queued=(0, 12000), running=(10, 0), prompt=20000), chunk_tokens=4096)
    assert pick("marginal_turnover", cold) == 1
    choice = rule_by_name("marginal_chunked").choose(cold, 0)
    assert (choice.rank, choice.excluded) == (0, (1,))
    # unchunked (chunk 0: SGLang's chunked prefill off), the slack is the whole prompt again
    assert pick("marginal_chunked", dataclasses.replace(cold, chunk_tokens=0)) == 1
    # the prefix cached on rank 1 counts in the slack: leaving it would re-prefill it elsewhere
    # (own wait 12000 + 12000 <= 20000 + 4096 + 8000 + 6000)
    warm = dataclasses.replace(cold, cached=(0, 8000))
    assert rule_by_name("marginal_chunked").choose(warm, 0).rank == 1
    # a prompt shorter than the chunk keeps its own length as slack: the same as marginal_turnover
    short = dataclasses.replace(view(cached=(0, 0), queued=(0, 1500), running=(10, 0), prompt=1000), chunk_tokens=4096)
    assert pick("marginal_chunked", short) == pick("marginal_turnover", short) == 1


def test_sglang_cache_aware_gates_on_imbalance_then_match_rate():
    # balanced, good match -> best match
    assert pick("sglang_cache_aware", view(cached=(0, 600), running=(1, 3))) == 1
    # balanced, weak match (<= 0.5) -> least load
    assert pick("sglang_cache_aware", view(cached=(0, 400), running=(1, 3))) == 0
    # imbalanced (diff > 32 and max > 1.1*min) -> least load even with a full match
    assert pick("sglang_cache_aware", view(cached=(0, 990), running=(1, 40))) == 0


def test_unknown_rule_is_a_clear_error_listing_the_registry():
    with pytest.raises(ValueError, match="unknown routing rule 'fastest'; choose from kvmul, kvmul_guard") as err:
        rule_by_name("fastest")
    assert "linear:<alpha>" in str(err.value)
    with pytest.raises(ValueError, match="takes no argument"):
        rule_by_name("kvmul:2")


def test_every_registered_rule_is_named_as_registered_and_documented():
    for name, spec in REGISTRY.items():
        rule = rule_by_name(f"{name}:0.5" if spec.arg_help else name)
        assert rule.name.split(":")[0] == name and isinstance(rule.reads_capacity, bool)
        assert f"{name}" in rule_help()


def test_round_robin_rule_takes_turns_through_the_router():
    r = KvmulRouter(3, 1, rule=rule_by_name("round_robin"))
    assert [r.route([1, 2, 3], 2, 0.0).rank for _ in range(6)] == [0, 1, 2, 0, 1, 2]


def test_total_tokens_picks_the_fewest_kv_tokens_blind_to_cache():
    assert pick("total_tokens", view(cached=(900, 0), kv=(5000, 4000))) == 1


def test_marginal_timed_counts_each_ranks_terms_in_its_own_time():
    """A cold 4000-token prompt: rank 0 idle with 2 requests running, rank 1 with 1000 tokens
    queued and 1 request. In tokens rank 1 is cheaper (1000 + 4000 * 2 < 4000 * 3); at twice rank
    0's pace it is not (2 x 9000 > 12000). Without a measured spread it is marginal_chunked."""
    v = dataclasses.replace(view(cached=(0, 0), queued=(0, 1000), running=(2, 1), prompt=4000), chunk_tokens=8192)
    assert pick("marginal_chunked", v) == pick("marginal_timed", v) == 1
    slow = dataclasses.replace(v, rank_slowdown=(2 / 3, 4 / 3))
    rule = rule_by_name("marginal_timed")
    assert rule.costs(slow) == pytest.approx([12000 * 2 / 3, 9000 * 4 / 3])
    assert rule.choose(slow, 0).rank == 0 and dict(rule.trips) == {"timed": 1, "speed_spread": 1}
    rule.choose(v, 0)
    assert rule.trips["timed"] == 1  # ranks that measure alike: not counted, decided in tokens
    # the bound is in time too: rank 1's own wait, 6000 queued + 4000 at 1.5 (15000), is past rank
    # 0's, 4000 at 0.5, plus the slack (the prompt, 4000, and the mean queue, 3000): 9000
    far = dataclasses.replace(view(cached=(0, 0), queued=(0, 6000), running=(40, 0), prompt=4000), chunk_tokens=8192)
    assert pick("marginal_chunked", far) == pick("marginal_timed", far) == 1  # 10000 <= 4000 + 7000 in tokens
    choice = rule_by_name("marginal_timed").choose(dataclasses.replace(far, rank_slowdown=(0.5, 1.5)), 0)
    assert (choice.rank, choice.excluded) == (0, (1,))


def test_marginal_room_adds_the_expected_wait_for_kv_pages_where_the_pool_is_short():
    """A 10000-token prompt cached to 4000 on rank 0, whose 100k pool is full (rank 1's is half
    used): 10000 tokens over, a tenth of what it holds, so it waits a tenth of one output's duration
    L for running requests to free them. Short outputs: that wait is less than re-prefilling the
    other 4000 tokens under 10 requests elsewhere, so it stays; long ones: it moves, and the wait is
    past its bound too. A session that holds a chunk or more of its prompt there (9000 of 10000,
    chunk 8192) is not priced the wait and stays. With room on rank 0, or on no rank, it is
    marginal_chunked exactly."""
    base = view(cached=(4000, 0), running=(10, 10), kv=(100_000, 50_000), prompt=10_000, max_kv=(100_000, 100_000))
    short = dataclasses.replace(base, chunk_tokens=8192, decode_output_tokens=20_000.0)
    rule = rule_by_name("marginal_room")
    assert rule.costs(short) == pytest.approx([6000 * 11 + 2000, 10_000 * 11])
    assert rule.choose(short, 0).rank == 0
    long = dataclasses.replace(short, decode_output_tokens=2_000_000.0)
    assert rule.costs(long)[0] == pytest.approx(6000 * 11 + 200_000)
    # own wait on rank 0: 6000 + 200000, past rank 1's 10000 plus the slack (min(10000, 8192 + 4000))
    assert (rule.choose(long, 0).rank, rule.choose(long, 0).excluded) == (1, (0,))
    session = dataclasses.replace(long, cached=[9000, 0])
    assert rule.costs(session) == rule_by_name("marginal_chunked").costs(session)
    assert (rule.choose(session, 0).rank, rule.choose(session, 0).excluded) == (0, ())
    room = dataclasses.replace(long, kv_tokens=[80_000, 50_000])
    assert rule.costs(room) == rule_by_name("marginal_chunked").costs(room)
    assert pick("marginal_room", room) == pick("marginal_chunked", room) == 0
    # every pool short: nowhere has room, the queues decide, as in marginal_chunked
    full = dataclasses.replace(long, kv_tokens=[100_000, 95_000])
    assert rule.costs(full) == rule_by_name("marginal_chunked").costs(full)


def test_marginal_room_counts_the_decisions_where_its_term_ran():
    """What the controller's `kvmul_rule_trips` reports: a decision with a wait priced, one where a
    rank holding the request's chunk was spared it, and none where no rank, or every rank, is short
    or L is not measured (each decision counted once, however often the rule reads its view)."""
    base = view(cached=(4000, 0), running=(10, 10), kv=(100_000, 50_000), prompt=10_000, max_kv=(100_000, 100_000))
    short = dataclasses.replace(base, chunk_tokens=8192, decode_output_tokens=2_000_000.0)
    rule = rule_by_name("marginal_room")
    for v in (
        short,
        dataclasses.replace(short, cached=[9000, 0]),  # spared on rank 0; rank 1 has room: nothing priced
        dataclasses.replace(short, kv_tokens=[80_000, 50_000]),  # room everywhere
        dataclasses.replace(short, kv_tokens=[100_000, 95_000]),  # no room anywhere
        dataclasses.replace(short, decode_output_tokens=0.0),  # L not measured yet
    ):
        rule.choose(v, 0)
    assert rule.trips == {"room_priced": 1, "room_exempt": 1}


def test_marginal_room_timed_prices_every_term_and_the_room_wait_in_each_ranks_time():
    """The default of stops 31-36: with the ranks measuring alike it is marginal_room exactly; with a measured
    spread each rank's cost, the room wait included, is times its slowdown, and each decision counts
    its trips once (the speed check replays the decision in tokens without tripping the room term
    again)."""
    base = view(cached=(4000, 0), running=(10, 10), kv=(100_000, 50_000), prompt=10_000, max_kv=(100_000, 100_000))
    short = dataclasses.replace(base, chunk_tokens=8192, decode_output_tokens=2_000_000.0)
    rule, room = rule_by_name("marginal_room_timed"), rule_by_name("marginal_room")
    assert rule.costs(short) == room.costs(short) == pytest.approx([6000 * 11 + 200_000, 10_000 * 11])
    assert rule.choose(short, 0) == room.choose(short, 0)
    slow = dataclasses.replace(short, rank_slowdown=(1.5, 0.5))
    assert rule.costs(slow) == pytest.approx([(6000 * 11 + 200_000) * 1.5, 10_000 * 11 * 0.5])
    assert rule.room_wait(slow) == pytest.approx([200_000 * 1.5, 0.0])
    rule.trips.clear()
    assert rule.choose(dataclasses.replace(slow), 0).rank == 1  # a new view: a new decision
    assert +rule.trips == Counter(room_priced=1, timed=1)  # the tokens-only replay also picks rank 1


def test_marginal_persist_prices_a_batch_above_the_mean_at_the_whole_decode_cost():
    """A 16016-token prompt cached to 16000 on rank 0, whose batch of 100 is far above the mean of
    52 (rank 1: 4). D is 3000 prefill tokens per request and the mean batch 20, so the rebalance share
    is 0.1: `marginal_room_timed` prices rank 0's batch at 300 a request and keeps the request there
    (16 * 101 + 300 * 100 against 16016 * 5 + 300 * 4). Above the mean the routing does not even
    the batch out, so its 48-request excess costs the whole D: 16 * 101 + 3000 * (10 + 0.9 * 48)
    is more than rank 1's, and the request re-prefills there. At or below the mean, or with the
    share at 1 (mean batch 2 or less), it is `marginal_room_timed` / the whole D exactly."""
    hot = dataclasses.replace(
        view(cached=(16000, 0), running=(100, 4), prompt=16016),
        chunk_tokens=8192, decode_tokens_per_request=3000.0, decode_batch_mean=20.0,
    )  # fmt: skip
    room_timed, rule = rule_by_name("marginal_room_timed"), rule_by_name("marginal_persist")
    assert room_timed.costs(hot) == pytest.approx([16 * 101 + 300 * 100, 16016 * 5 + 300 * 4])
    assert room_timed.choose(hot, 0).rank == 0
    assert rule.costs(hot) == pytest.approx([16 * 101 + 3000 * (10 + 0.9 * 48), 16016 * 5 + 300 * 4])
    assert rule.choose(hot, 0).rank == 1
    even = dataclasses.replace(hot, running=[50, 50], batch=[])
    assert rule.costs(even) == pytest.approx(room_timed.costs(even))
    small = dataclasses.replace(hot, decode_batch_mean=2.0)
    assert rule.costs(small) == pytest.approx([16 * 101 + 3000 * 100, 16016 * 5 + 3000 * 4])
    unmeasured = dataclasses.replace(hot, decode_tokens_per_request=0.0)
    assert rule.costs(unmeasured) == room_timed.costs(unmeasured)


def test_marginal_shared_moves_a_request_off_a_shared_stem_but_not_off_its_own_context():
    """The default rule. The persist test's hot rank, twice. Cached to the stem (16000 tokens that other prompts
    branch from: a shared document), the request is `marginal_persist`'s and goes to rank 1, copying
    a prefix the next requests for it use too; that decision counts one `shared_stem` trip. Cached
    past the stem (stem 6000: a session's own 10000 tokens on top of a system prompt), it is
    `marginal_room_timed`'s and stays with its context. Nothing cached anywhere (stem 0) is
    persist's too: nothing of its own to leave. With a pool short of room for the prompt (rank 1's
    KV plus the prompt past its size) it is `marginal_room_timed`'s again: KV, not the routing,
    caps the batches then, and a move re-prefills into a pool that must evict."""
    hot = dataclasses.replace(
        view(cached=(16000, 0), running=(100, 4), prompt=16016),
        chunk_tokens=8192, decode_tokens_per_request=3000.0, decode_batch_mean=20.0,
    )  # fmt: skip
    names = ("marginal_room_timed", "marginal_persist", "marginal_shared")
    room_timed, persist, rule = map(rule_by_name, names)
    # the default (`marginal_behind_held`) is this rule where no one waits and nothing is queued
    assert rule_by_name(DEFAULT_RULE).costs(hot) == pytest.approx(rule.costs(hot))
    shared = dataclasses.replace(hot, stem=16000)
    assert rule.costs(shared) == pytest.approx(persist.costs(shared))
    assert rule.choose(shared, 0).rank == 1 and rule.trips["shared_stem"] == 1
    own = dataclasses.replace(hot, stem=6000)
    assert rule.costs(own) == pytest.approx(room_timed.costs(own))
    assert rule.choose(own, 0).rank == 0 and rule.trips["shared_stem"] == 1
    cold = dataclasses.replace(hot, cached=(0, 0), stem=0)
    assert rule.costs(cold) == pytest.approx(persist.costs(cold))
    roomy = dataclasses.replace(shared, kv_tokens=[20000, 1000], max_kv_tokens=[100000, 17016])
    assert rule.costs(roomy) == pytest.approx(persist.costs(roomy))  # 1000 + 16016 fits in 17016
    short = dataclasses.replace(roomy, max_kv_tokens=[100000, 17015])
    assert rule.costs(short) == pytest.approx(room_timed.costs(short))
    assert rule.choose(short, 0).rank == 0 and rule.trips["shared_stem"] == 1


def test_marginal_behind_counts_the_requests_that_will_queue_behind_a_long_prefill():
    """A 64k-token prompt cached nowhere. Rank 0 has the shorter queue (12k prefill tokens) but 6
    requests waiting in it; rank 1 a longer one (30k) with its 10 requests all running. Both
    batches are 10, so `marginal_shared` prices the pause alike and takes the shorter queue: 12k +
    64k * 11 against 30k + 64k * 11. Each of rank 0's waiting requests stands for one that will
    arrive behind the prompt's prefill there, so `marginal_behind` prices rank 0 at 12k + 64k * 17
    and takes rank 1. Its own slack is one chunk plus the mean queue (8192 + 21k, under the
    prompt; `marginal_shared`'s is the chunk alone). With nothing waiting anywhere the two rules
    cost every rank alike."""
    long = dataclasses.replace(
        view(cached=(0, 0), queued=(12_000, 30_000), running=(4, 10), waiting=(6, 0), prompt=64_000),
        chunk_tokens=8192,
    )
    shared, rule = rule_by_name("marginal_shared"), rule_by_name("marginal_behind")
    assert shared.costs(long) == pytest.approx([12_000 + 64_000 * 11, 30_000 + 64_000 * 11])
    assert shared.choose(long, 0).rank == 0
    assert rule.costs(long) == pytest.approx([12_000 + 64_000 * 17, 30_000 + 64_000 * 11])
    assert rule.choose(long, 0).rank == 1
    assert rule.own_slack(long) == 8192 + 21_000 and shared.own_slack(long) == 8192
    assert rule.own_slack(dataclasses.replace(long, queued=[200_000, 200_000])) == 64_000  # at most the prompt
    idle = dataclasses.replace(long, running=[10, 10], waiting=[0, 0], batch=[])
    assert rule.costs(idle) == pytest.approx(shared.costs(idle))


def test_marginal_behind_held_does_not_count_kv_waiters_against_the_rank_holding_the_session():
    """A session's next turn: 20k tokens of its context cached on rank 0, 6k new. Rank 0's pool is
    short (95k held + the 26k prompt over a 100k pool) and 20 requests wait there for pages; rank 1
    has room and none waiting. `marginal_behind` counts rank 0's 20 waiters as held up by the 6k new
    tokens (4k + 6k * (28 + 1 + 20) = 298k against rank 1's 4k + 26k * 9 = 238k) and moves the session,
    re-prefilling its context; `marginal_behind_held` does not count them on the rank holding a chunk
    or more of the prompt (4k + 6k * 29 = 178k) and keeps it. With the pools roomy, or the prompt held
    by less than a chunk, the two cost every rank alike."""
    turn = dataclasses.replace(
        view(
            cached=(20_000, 0),
            queued=(4_000, 4_000),
            running=(8, 8),
            waiting=(20, 0),
            kv=(95_000, 10_000),
            prompt=26_000,
            max_kv=(100_000, 100_000),
        ),
        chunk_tokens=8192,
    )
    behind, rule = rule_by_name("marginal_behind"), rule_by_name("marginal_behind_held")
    assert behind.costs(turn) == pytest.approx([4_000 + 6_000 * 49, 4_000 + 26_000 * 9])
    assert behind.choose(turn, 0).rank == 1
    assert rule.costs(turn) == pytest.approx([4_000 + 6_000 * 29, 4_000 + 26_000 * 9])
    assert rule.choose(turn, 0).rank == 0
    roomy = dataclasses.replace(turn, max_kv_tokens=[200_000, 200_000])
    assert rule.costs(roomy) == behind.costs(roomy) and rule.choose(roomy, 0).rank == 1
    thin = dataclasses.replace(turn, cached=[8_000, 0])  # 8k held: less than a chunk
    assert rule.costs(thin) == pytest.approx(behind.costs(thin))


def test_marginal_fresh_prices_a_pause_on_requests_not_yet_decoding_by_the_outputs_spread():
    """A 20k-token prompt cached nowhere. Rank 0's queue has just drained: 6 running, 4 of them just
    prefilled (fresh); rank 1 is still prefilling (9k queued, 1 waiting) and its 6 running have decoded
    a while. `marginal_behind_held` takes the drained rank (20k * 7 = 140k against 9k + 20k * 9 = 189k).
    With outputs whose spread makes a pause on a fresh request cost 3x (the measured weight), each
    uncached token also costs 2 x (fresh + waiting): 140k + 2 * 20k * 4 = 300k on rank 0 against 189k
    + 2 * 20k * 1 = 229k on rank 1, where the one waiting request will be fresh when the prompt's
    prefill runs behind it. With outputs alike (weight 1), no fresh counts reported, or mixed chunks
    (a prefill step pauses no decode), it is `marginal_behind_held` exactly."""
    cold = dataclasses.replace(
        view(cached=(0, 0), queued=(0, 9_000), running=(6, 6), waiting=(0, 1), prompt=20_000),
        fresh=[4, 0],
        fresh_pause_weight=3.0,
    )
    held, rule = rule_by_name("marginal_behind_held"), rule_by_name("marginal_fresh")
    assert held.costs(cold) == pytest.approx([140_000, 189_000]) and held.choose(cold, 0).rank == 0
    assert rule.costs(cold) == pytest.approx([300_000, 229_000]) and rule.choose(cold, 0).rank == 1
    alike, unreported = dataclasses.replace(cold, fresh_pause_weight=1.0), dataclasses.replace(cold, fresh=())
    for plain in (alike, unreported, dataclasses.replace(cold, mixed_chunk=True)):
        assert rule.costs(plain) == held.costs(plain) and rule.choose(plain, 0).rank == 0
    # on ranks that measure different speeds the premium is in each rank's time, as every other term
    timed = dataclasses.replace(cold, rank_slowdown=[0.5, 1.5])
    assert rule.costs(timed) == pytest.approx([(140_000 + 160_000) * 0.5, (189_000 + 40_000) * 1.5])
