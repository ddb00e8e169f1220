"""The measured decode cost (`core.decode_cost`) and the simulator's decode moments, against their
definitions."""

import numpy as np
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
        rank.enqueue(SimRequest(rid, 0.0, tuple(range(rid * 100, rid * 100 + 50)), output_len=5))
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
