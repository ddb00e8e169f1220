from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_kvmul.core.prefix import cached_tokens, max_prefix_len, uncached_tokens
from sglang_kvmul.core.score import kvmul_scores, pick_lowest


def test_score_is_prefill_work_times_batch_plus_one():
    assert kvmul_scores([100], [20], [3]) == [120 * 4]
    assert kvmul_scores([100], [20], [3], time_per_token=[2.0]) == [120 * 2.0 * 4]  # the guard's unit
    assert kvmul_scores([0, 50], [10, 10], [0, 0]) == [10, 60]


def test_idle_ranks_are_still_told_apart_by_prefill_work():
    # Without the +1 both idle ranks would score 0 whatever they would have to prefill.
    scores = kvmul_scores([0, 0], [1000, 10], [0, 0])
    assert pick_lowest(scores, [0, 0], 0)[0] == 1


def test_product_trades_cache_against_batch():
    # rank 0 holds the prefix but runs 9 requests; rank 1 is cold and runs 1.
    scores = kvmul_scores([0, 0], [32, 1056], [9, 1])
    assert scores == [320, 2112]
    assert pick_lowest(scores, [0, 0], 0)[0] == 0
    scores = kvmul_scores([0, 0], [32, 1056], [99, 1])
    assert pick_lowest(scores, [0, 0], 0)[0] == 1


def test_ties_prefer_least_queued_then_rotate():
    assert pick_lowest([10, 10, 10], [5, 0, 5], 0) == (1, False)  # decided by queue, no rotation
    assert pick_lowest([10, 10, 10], [5, 0, 0], 1) == (2, True)
    picks = {pick_lowest([7, 7], [0, 0], r)[0] for r in range(4)}
    assert picks == {0, 1}
    assert pick_lowest([3, 7], [0, 0], 1) == (0, False)


def test_prefix_formula_matches_scheduler_caps():
    assert max_prefix_len(100) == 99
    assert max_prefix_len(100, return_logprob=True, logprob_start_len=10) == 10
    assert max_prefix_len(100, return_logprob=False, logprob_start_len=10) == 99
    assert max_prefix_len(0) == 0
    # a whole prompt cached still leaves its last token to compute
    assert cached_tokens(matched=100, limit=99, page_size=1) == 99
    # page-floored
    assert cached_tokens(matched=64, limit=99, page_size=16) == 64
    assert cached_tokens(matched=96, limit=99, page_size=16) == 96
    assert cached_tokens(matched=112, limit=99, page_size=16) == 96
    assert uncached_tokens(prompt_len=100, matched=64, limit=99, page_size=16) == 36


@settings(max_examples=500, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from([0, 1, 2, 2.0, float("inf")]), st.sampled_from([0, 1, 1.0, 3])), min_size=1),
    st.integers(0, 50),
)
def test_pick_lowest_is_the_plain_definition(ranks, rotation):
    """The C-level argmin (all-tied and partly-tied fast paths, mixed int/float costs) picks what
    the definition says: lowest cost, then least queued work, then the rotation among those left."""
    scores, queued = [s for s, _ in ranks], [q for _, q in ranks]
    best = min(scores)
    tied = [i for i, s in enumerate(scores) if s == best]
    least = min(queued[i] for i in tied)
    tied = [i for i in tied if queued[i] == least]
    expected = (tied[rotation % len(tied)], len(tied) > 1) if len(tied) > 1 else (tied[0], False)
    if scores.count(best) == 1:
        expected = (scores.index(best), False)
    assert pick_lowest(scores, queued, rotation) == expected
