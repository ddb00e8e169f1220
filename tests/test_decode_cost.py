"""The measured decode cost (`core.decode_cost`) and the simulator's decode moments, against their
definitions."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sglang_kvmul.core.decode_cost import PooledDecodeCost, step_slope_us
from sglang_kvmul.core.tunables import MIN_DECODE_STEPS_FOR_SLOPE, MIN_TOKENS_FOR_SPEED
from sglang_kvmul.sim.cost import LinearCost
from sglang_kvmul.sim.rank import RankConfig, SimRank, SimRequest


def _moments(points):
    b = np.array([p[0] for p in points], float)
    t = np.array([p[1] for p in points], float)
    return [len(points), b.sum(), t.sum(), (b * b).sum(), (b * t).sum(), b.sum()]


@given(st.lists(st.tuples(st.integers(1, 256), st.floats(100, 1e5)), min_size=2, max_size=60))
def test_slope_is_the_least_squares_fit_or_zero(points):
    got = step_slope_us(*_moments(points)[:5])
    b = [p[0] for p in points]
    if len(set(b)) == 1:
        assert got == 0.0  # one batch size: no slope can be told
    else:
        expected = np.polyfit(b, [p[1] for p in points], 1)[0]
        assert got == max(0.0, expected) or abs(got - max(0.0, expected)) <= 1e-6 * max(1.0, abs(expected))


def test_pooled_cost_waits_for_enough_measurements_and_pools_ranks():
    pc = PooledDecodeCost(2)
    few = _moments([(2, 1000.0), (4, 1400.0)])
    pc.update(0, few, busy_us=10**6, tokens=MIN_TOKENS_FOR_SPEED, decoders=3)
    assert pc.tokens_per_request == 0.0  # two steps are not a measurement
    half = MIN_DECODE_STEPS_FOR_SLOPE // 2
    pc.update(0, _moments([(2, 1000.0)] * half), busy_us=10**6, tokens=MIN_TOKENS_FOR_SPEED, decoders=4)
    assert pc.tokens_per_request == 0.0
    # rank 1's steps at another batch size complete the fit: slope 200 us per request, from both ranks
    pc.update(1, _moments([(4, 1400.0)] * half), busy_us=10**6, tokens=MIN_TOKENS_FOR_SPEED, decoders=4)
    steps = (2 + 4) * half / 8
    assert pc.slope_us == 200.0 and pc.steps_per_request == steps
    assert pc.tokens_per_request == 200.0 * steps / (2 * 10**6 / (2 * MIN_TOKENS_FOR_SPEED))
    pc.update(1, [], busy_us=10**6, tokens=MIN_TOKENS_FOR_SPEED, decoders=4)  # a rank that stops reporting
    assert pc.tokens_per_request == pc.slope_us == pc.steps_per_request == 0.0  # no stale estimate is left


def test_simulated_rank_reports_its_decode_steps_as_sglang_does():
    cost = LinearCost()
    rank = SimRank(0, RankConfig(page_size=1, kv_pages=10_000), cost)
    for rid in range(3):
        rank.enqueue(SimRequest(rid, 0.0, tuple(range(rid * 100, rid * 100 + 50)), output_len=5), 0.0)
    now, steps = 0.0, []
    while (end := rank.start_step(now)) is not None:
        if rank.decoding:
            steps.append((len(rank.running), rank.block_steps, end - now))
        rank.finish_step(end)
        now = end
    m = rank.snapshot(now)["decode_moments"]
    assert m[0] == sum(k for _, k, _ in steps) == 4  # one token from the prefill, four decode steps
    assert m[1] == sum(b * k for b, k, _ in steps) == 12
    assert abs(m[2] - sum(t for _, _, t in steps) * 1e6) < 1e-3
    assert abs(m[2] - 4 * cost.decode_s(3, 0) * 1e6) < 0.1 * m[2]  # context grows a little per step


def test_a_garbled_moment_list_is_ignored_not_pooled():
    from sglang_kvmul.core.load_ledger import LoadSnapshotView, RankLoad

    load = RankLoad()
    good = [300.0, 600.0, 4e5, 1200.0, 8e5, 600.0]
    load.on_snapshot(LoadSnapshotView(1.0, 1, 0, 0, 0, decode_moments=good))
    assert load.decode_moments == tuple(good)
    for bad in ([float("nan")] * 6, [1.0, -2.0, 3.0, 4.0, 5.0, 6.0], [1.0, 2.0]):
        load.on_snapshot(LoadSnapshotView(load.snap_time + 1, 1, 0, 0, 0, decode_moments=bad))
        assert load.decode_moments == tuple(good)  # the last good figures stay


def test_rank_slowdown_counts_a_rank_slow_only_where_decode_and_prefill_agree():
    """Rank 1 runs every batch size and every prefill token twice as slowly as ranks 0 and 2: its
    slowdown, scaled to mean 1, is twice theirs. Equal ranks with different batch mixes measure alike
    (the pooled line predicts each one's own batches) and the slowdown stays empty: a rule that reads
    it decides as if it did not exist. A rank slow at decode alone (long contexts, say) or at prefill
    alone (short suffixes) is not slow: the two measures must agree."""
    k = MIN_DECODE_STEPS_FOR_SLOPE

    def step(b, pace=1.0):
        return (b, pace * (1000.0 + 100.0 * b))

    def feed(pc, decode_paces, prefill_paces, mixes):
        for r, (dp, pp, mix) in enumerate(zip(decode_paces, prefill_paces, mixes, strict=True)):
            pts = [step(b, dp) for b in mix] * (k // len(mix))
            pc.update(r, _moments(pts), busy_us=int(pp * 10**6), tokens=MIN_TOKENS_FOR_SPEED, decoders=k)

    same = ([2, 4], [2, 4], [2, 4])
    equal = PooledDecodeCost(3)
    feed(equal, (1.0, 1.0, 1.0), (1.0, 1.0, 1.0), ([2, 4], [8, 16], [1, 32]))
    assert equal.slope_us == pytest.approx(100.0) and equal.rank_slowdown == []
    slow = PooledDecodeCost(3)
    feed(slow, (1.0, 2.0, 1.0), (1.0, 2.0, 1.0), same)
    s = slow.rank_slowdown
    assert len(s) == 3 and sum(s) == pytest.approx(3.0)
    assert s[1] == pytest.approx(2 * s[0]) and s[0] == pytest.approx(s[2])
    # the smaller of the two says how slow: decode 3x, prefill 2x -> 2x
    mixed = PooledDecodeCost(3)
    feed(mixed, (1.0, 3.0, 1.0), (1.0, 2.0, 1.0), same)
    assert mixed.rank_slowdown[1] == pytest.approx(2 * mixed.rank_slowdown[0], rel=0.05)
    for decode, prefill in (((1.0, 2.0, 1.0), (1.0, 1.0, 1.0)), ((1.0, 1.0, 1.0), (1.0, 2.0, 1.0)),
                            ((1.0, 2.0, 1.0), (2.0, 1.0, 2.0))):  # fmt: skip
        one_sided = PooledDecodeCost(3)
        feed(one_sided, decode, prefill, same)
        assert one_sided.rank_slowdown == []
    # a rank without enough decode steps of its own is neither slow nor fast: between the two
    partial = PooledDecodeCost(3)
    feed(partial, (1.0, 2.0, 1.0), (1.0, 2.0, 1.0), same)
    partial.update(2, _moments([step(3)] * 4), busy_us=10**6, tokens=MIN_TOKENS_FOR_SPEED, decoders=4)
    p = partial.rank_slowdown
    assert p[0] < p[2] < p[1] and p[1] > 1.7 * p[0] and sum(p) == pytest.approx(3.0)


def test_output_spread_weighs_a_fresh_requests_pause_by_the_finished_outputs():
    """(Obar - 1) x E[1 / (O - 1)] over the finished outputs, pooled over ranks: 1 when every output is
    as long, and none before MIN_FINISHED_FOR_SPREAD outputs; a rank's figures replace its earlier
    ones (cumulative, as SGLang's counters)."""
    from sglang_kvmul.core.decode_cost import PooledOutputSpread
    from sglang_kvmul.core.tunables import MIN_FINISHED_FOR_SPREAD

    def sums(outputs):
        return (float(len(outputs)), float(sum(outputs)), sum(1.0 / (o - 1) for o in outputs))

    spread = PooledOutputSpread(2)
    spread.update(0, sums([50] * MIN_FINISHED_FOR_SPREAD))
    assert spread.fresh_pause_weight == pytest.approx(1.0) and spread.output_mean == 50.0  # alike: no premium
    few = [3, 101] * (MIN_FINISHED_FOR_SPREAD // 4)
    spread = PooledOutputSpread(2)
    spread.update(1, sums(few))
    assert spread.fresh_pause_weight == 1.0  # too few outputs to tell their spread
    spread.update(1, sums(few * 2))  # the same rank, later: its cumulative figures replace the earlier ones
    assert spread.finished == len(few) * 2
    assert spread.fresh_pause_weight == pytest.approx((52 - 1) * (1 / 2 + 1 / 100) / 2)  # ~13
    spread.update(0, sums([52] * len(few) * 2))  # pooled with rank 0's alike outputs: a smaller spread
    assert spread.fresh_pause_weight == pytest.approx((52 - 1) * ((1 / 2 + 1 / 100) / 2 + 1 / 51) / 2)
    spread.update(0, ())
    spread.update(1, ())  # ranks that stop reporting (SGLang without the hook): no stale weight
    assert spread.fresh_pause_weight == 1.0 and spread.finished == 0 and spread.inverse_mean == 0.0


def test_the_ledger_reads_fresh_requests_and_finished_outputs_past_sglangs_six_sums():
    from sglang_kvmul.core.load_ledger import LoadSnapshotView, RankLoad

    load = RankLoad()
    six = [300.0, 600.0, 4e5, 1200.0, 8e5, 600.0]
    load.on_snapshot(LoadSnapshotView(1.0, 5, 0, 0, 0, decode_moments=six))
    assert load.fresh == 0 and load.finished_outputs == ()  # SGLang alone reports neither
    load.on_snapshot(LoadSnapshotView(2.0, 5, 0, 0, 0, decode_moments=[*six, 3.0, 40.0, 900.0, 6.5]))
    assert load.fresh == 3 and load.finished_outputs == (40.0, 900.0, 6.5)


def test_simulated_rank_reports_fresh_requests_and_finished_outputs():
    """Right after their prefill, requests have one token and count as fresh until a decode step;
    a finished request with two or more output tokens adds its output and 1 / (output - 1)."""
    rank = SimRank(0, RankConfig(page_size=1, kv_pages=10_000, chunk_tokens=10_000), LinearCost())
    for rid, out in enumerate((3, 10, 1)):
        rank.enqueue(SimRequest(rid, 0.0, tuple(range(rid * 100, rid * 100 + 50)), output_len=out), 0.0)
    end = rank.start_step(0.0)  # one prefill batch for all three
    rank.finish_step(end)
    m = rank.snapshot(end)["decode_moments"]
    assert m[6] == 2  # the 1-token request finished at its prefill; the others have not decoded yet
    assert m[7:] == [0.0, 0.0, 0.0]
    now = end
    while (end := rank.start_step(now)) is not None:
        rank.finish_step(end)
        now = end
    m = rank.snapshot(now)["decode_moments"]
    assert m[6] == 0 and m[7:] == pytest.approx([2.0, 13.0, 1 / 2 + 1 / 9])
