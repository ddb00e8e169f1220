"""The guard over the product rule: silent when no condition holds, and each detector's mitigation."""

import json

from helpers import view

from sglang_kvmul.core.rules import rule_by_name


class _Pick:
    """rule(view, rotation) -> the chosen rank, for brevity below."""

    def __init__(self, name: str) -> None:
        self.rule = rule_by_name(name)
        self.trips = getattr(self.rule, "trips", None)

    def __call__(self, v, rotation=0):
        return self.rule.choose(v, rotation).rank


def test_without_a_condition_the_guard_is_the_product_rule():
    guard, plain = _Pick("kvmul_guard"), _Pick("kvmul")
    for v in (
        view((900, 0), running=(3, 0)),
        view((900, 0), running=(10, 0), max_running=(256, 256), max_kv=(10**6, 10**6)),
        view((0, 500), running=(1, 4), speed=(10.0, 11.0)),  # within the noise threshold
    ):
        assert guard(v) == plain(v)
    assert not guard.trips


def test_a_saturated_choice_goes_to_a_rank_that_can_start_the_request():
    guard = _Pick("kvmul_guard")
    at_cap = view((999, 0), running=(8, 0), max_running=(8, 8))  # product: 1*9 < 1000*1, but rank 0 is full
    assert _Pick("kvmul")(at_cap) == 0 and guard(at_cap) == 1
    no_kv = view((999, 0), running=(1, 0), kv=(9990, 0), max_kv=(10_000, 10_000))  # 9990 + 1 > 10000? no
    assert guard(no_kv) == 0
    no_kv = view((900, 0), running=(1, 0), kv=(9950, 0), max_kv=(10_000, 10_000))  # 9950 + 100 > 10000
    assert guard(no_kv) == 1
    everyone_full = view((999, 0), running=(8, 8), max_running=(8, 8))  # nowhere better: the product decides
    assert guard(everyone_full) == 0
    assert guard.trips["saturated"] == 2


def test_a_speed_spread_counts_prefill_in_measured_time():
    guard = _Pick("kvmul_guard")
    # product in tokens: 600*1 vs 1000*1 -> rank 0; rank 0 is 3x slower per token: 1800 vs 1000 -> rank 1
    slow = view((400, 0), speed=(30.0, 10.0))
    assert _Pick("kvmul")(slow) == 0 and guard(slow) == 1
    assert guard.trips["speed_spread"] == 1


def test_a_backlogged_cluster_keeps_a_request_where_its_prefix_is_cached():
    guard, plain = _Pick("kvmul_guard"), _Pick("kvmul")
    # product: (500 + 200) * 9 = 6300 vs (400 + 1000) * 4 = 5600 -> rank 1, re-prefilling 800 cached tokens
    busy = view((800, 0), running=(8, 3), queued=(500, 400))
    assert plain(busy) == 1 and guard(busy) == 0
    assert guard.trips["backlogged"] == 1
    idle = view((800, 0), running=(8, 3), queued=(500, 0))  # rank 1 has nothing queued: the product moves it
    assert guard(idle) == plain(idle) == 1
    nothing_cached = view((0, 0), running=(8, 3), queued=(500, 400))
    assert guard(nothing_cached) == plain(nothing_cached) == 1
    # capacity beats affinity: the caching rank is at its running cap
    capped = view((800, 0), running=(8, 3), queued=(500, 400), max_running=(8, 8))
    assert guard(capped) == 1
    assert guard.trips["backlogged"] == 1 and guard.trips["saturated"] == 0  # the product chose 1 anyway


def test_a_guarded_choice_keeps_its_costs_finite_and_names_the_excluded_ranks():
    """The decision log is JSON and `kvmul_last_score` a gauge: no Infinity may reach either."""
    guard = rule_by_name("kvmul_guard")
    choice = guard.choose(view((999, 0), running=(8, 0), max_running=(8, 8)), 0)
    assert choice.rank == 1 and choice.excluded == (0,)
    json.dumps(choice.costs, allow_nan=False)


def test_the_router_gives_the_guard_the_capacity_sglang_reports():
    """Through KvmulRouter: rank 0 caches the prompt but reported itself at its running cap."""
    from sglang_kvmul.core.load_ledger import LoadSnapshotView
    from sglang_kvmul.core.router import KvmulRouter
    from sglang_kvmul.sim.prefix_cache import SimPrefixCache

    prompt = list(range(3, 67))
    cache = SimPrefixCache(16, 100)
    cache.insert(prompt, 0.0)
    events = cache.take_events()
    for rule, expected in (("kvmul", 0), ("kvmul_guard", 1)):
        r = KvmulRouter(2, 16, rule=rule_by_name(rule))
        r.apply_events(0, events)
        snap = LoadSnapshotView(1.0, 2, 0, 0, 0, max_running_requests=2, max_total_num_tokens=10_000)
        r.apply_snapshot(0, snap, 1.0)  # kvmul: 16 uncached * (2 + 1) = 48 < 64 * 1
        assert r.decide(prompt, len(prompt) - 1).rank == expected, rule
