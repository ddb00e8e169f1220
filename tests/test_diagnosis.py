"""The diagnosis benchmark's own arithmetic (`benchmarks/sim_diagnosis.py`): where the slowest 1% of
requests spent their time, and which rules meet the issue's bar at all. Hand-made requests and rows,
so a wrong split or a wrong verdict shows here and not as a plausible table."""

from dataclasses import replace

import numpy as np
import pytest

from benchmarks import sim_diagnosis as sd
from benchmarks import sim_frontier as frontier
from benchmarks import sim_nuisance as nuisance
from benchmarks import sim_room_estimate as room_estimate
from benchmarks.policy_comparison import against_product
from benchmarks.sim_cold_tail import cold_counts
from benchmarks.sim_experiments import attribution
from benchmarks.sim_overload import size_classes
from benchmarks.sim_tally import SETS, nobody_meets, trades
from benchmarks.sim_tally import points as stored_points
from sglang_kvmul.core.decode_cost import PooledDecodeCost
from sglang_kvmul.core.rules import Choice, RankView
from sglang_kvmul.sim.engine import SimConfig
from sglang_kvmul.sim.rank import SimRequest


def _request(
    rid: int, prompt: int, queue: float, kv_wait: float, prefill: float, cached: int = 0, behind_kv: float = 0.0
) -> SimRequest:
    req = SimRequest(rid, arrival=10.0, tokens=tuple(range(prompt)), output_len=2, cached=cached)
    req.kv_wait = kv_wait
    req.kv_blocked = kv_wait + behind_kv  # part of its queueing was behind a head waiting for pages
    req.admitted_at = req.arrival + queue + kv_wait
    req.first_token = req.admitted_at + prefill
    return req


def test_the_slowest_percent_is_split_into_its_own_causes():
    # 198 fast requests and 2 slow ones (the top 1%): a long cold prompt that queued, and one that
    # waited for KV pages; the tail's split must be theirs alone and add up to their TTFT
    reqs = [_request(i, 100, 0.01, 0.0, 0.02, cached=50) for i in range(198)]
    reqs += [_request(198, 90_000, 8.0, 0.0, 3.0, behind_kv=3.0), _request(199, 50_000, 1.0, 2.0, 1.5, cached=10_000)]
    a = attribution(reqs)
    assert a["tail_queue_ms"] == 4500.0 and a["tail_kv_wait_ms"] == 1000.0 and a["tail_prefill_ms"] == 2250.0
    assert a["tail_behind_kv_ms"] == 1500.0 and a["ttft_behind_kv_ms"] == 15.0  # 3 s of 8 s queueing, one request
    assert (a["tail_prompt_tokens"], a["tail_uncached_tokens"]) == (70_000, 65_000)
    assert a["ttft_queue_ms"] < 60  # the means are still over everyone


def test_the_cold_census_splits_first_uses_from_copies_and_counts_them_in_the_slowest_percent():
    # 196 warm requests on rank 0 (fast) and 4 cold ones: a first use (no rank held the prompt) and
    # three copies (another rank held it), two of them on the half-speed rank 1; the 2 slowest are cold
    reqs = [_request(i, 100, 0.01, 0.0, 0.02, cached=96) for i in range(196)]
    first = _request(196, 100, 0.01, 0.0, 0.5)
    copies = [_request(197 + i, 100, 0.01, 0.0, 0.04 + 0.3 * (i == 0)) for i in range(3)]
    for r in copies:
        r.best_cached = 96
    for r in (*reqs, first):
        r.rank = 0
    for i, r in enumerate(copies):
        r.rank = 1 if i < 2 else 0
    c = cold_counts([*reqs, first, *copies], speeds=[1.0, 0.5])
    assert (c["cold"], c["cold_copies"], c["cold_on_slower"]) == (4, 3, 2)
    assert (c["tail_requests"], c["tail_cold"]) == (2, 2)  # the first use (0.51 s) and the slow copy (0.35 s)
    assert round(c["warm_ttft_p99_ms"], 6) == 30.0 and round(c["cold_ttft_p50_ms"], 6) == 200.0  # (50 + 350) / 2


def test_the_overload_split_counts_fresh_prefill_not_the_prompt():
    # chunk 100: a 1,000-token prompt of which a rank held 700 is 300 fresh (not long); a 1,000-token
    # prompt nobody held is 1,000 fresh (long, over 4 chunks); 98 short ones of 50 fresh tokens
    held = _request(0, 1000, 0.1, 0.0, 0.1, cached=700)
    held.best_cached = 700
    cold = _request(1, 1000, 2.0, 0.0, 1.0, behind_kv=0.5)
    rest = [_request(2 + i, 50, 0.01, 0.0, 0.01) for i in range(98)]
    c = size_classes([held, cold, *rest], chunk=100)
    assert c["long_requests"] == 1 and round(c["long_fresh_share"], 6) == round(1000 / (1000 + 300 + 98 * 50), 6)
    assert round(c["long_ttft_mean_ms"], 6) == 3000.0 and round(c["long_behind_kv_ms"], 6) == 500.0
    assert round(c["rest_ttft_mean_ms"], 6) == round((200 + 98 * 20) / 99, 6) and c["rest_behind_kv_ms"] == 0.0


def _row(rule: str, ttft: float, tpot: float, p99: float) -> dict:
    return {"case": "c", "seed": 0, "rule": rule, "ttft_mean_ms": ttft, "tpot_mean_ms": tpot, "ttft_p99_ms": p99}


def test_reachable_names_every_rule_within_the_bar_or_the_nearest_one():
    # the best TTFT and the best TPOT come from different baselines: only a rule near both meets the bar
    rows = [_row("linear:0.5", 100, 20, 300), _row("dynamo", 150, 10, 280), _row("ours", 104, 10.4, 300)]
    assert sd.reachable(rows)[2] == "| c | 0 | ours | |"
    # nobody within 1.05x of both: the nearest by its worst ratio over the gate (ours: TPOT 1.3 / 1.05)
    rows[2] = _row("ours", 104, 13, 300)
    assert sd.reachable(rows)[2] == "| c | 0 | none | ours (0.99 / 1.24 / 0.97) |"


def test_the_tally_counts_each_point_once_and_names_those_nobody_meets():
    near = [_row("linear:0.5", 100, 20, 300), _row("dynamo", 150, 10, 280), _row("ours", 104, 10.4, 300)]
    far = [{**r, "case": "d"} for r in (_row("linear:0.5", 100, 20, 300), _row("dynamo", 150, 10, 280),
                                         _row("ours", 104, 13, 300))]  # fmt: skip
    ours, dynamo = (sd.rule_stats(near + far, rule) for rule in ("ours", "dynamo"))
    assert (ours["met"], ours["points"], dynamo["met"]) == (1, 2, 0)
    assert ours["worst"]["tpot_mean_ms"] == 1.3 and ours["worst_case"]["tpot_mean_ms"] == "d"
    assert round(ours["geo"]["tpot_mean_ms"], 6) == round((1.04 * 1.3) ** 0.5, 6)
    assert nobody_meets(near + far) == [("d", 0)]


def test_the_trades_name_the_points_the_default_misses_and_what_the_other_rule_gives_up():
    # point c: "other" meets it and the default does not; point d: the reverse; point e: both meet it
    base = [_row("linear:0.5", 100, 20, 300), _row("dynamo", 150, 10, 280)]
    rows = [*base, _row("ours", 104, 13, 300), _row("other", 104, 10.4, 300)]
    rows += [{**r, "case": "d"} for r in (*base, _row("ours", 104, 10.4, 300), _row("other", 104, 13, 300))]
    rows += [{**r, "case": "e"} for r in (*base, _row("ours", 100, 10, 280), _row("other", 100, 10, 280))]
    rows.append({**_row("third", 100, 10, 280), "case": "e"})  # ran on one point only
    missed, swaps = trades(rows, "ours", ["ours", "other", "third"])
    assert [(m["case"], m["met_by"]) for m in missed] == [("c", ["other"])]
    assert round(missed[0]["default"]["tpot_mean_ms"], 6) == round(1.3 / 1.05, 6)
    assert swaps == [{"rule": "other", "points": 3, "gains": 1, "losses": 1},
                     {"rule": "third", "points": 1, "gains": 0, "losses": 0}]  # fmt: skip


def test_the_frontier_gives_each_metrics_nearest_within_the_other_gates_and_the_pareto_front():
    # baselines: TTFT best 100 (linear), TPOT best 10 (dynamo), P99 best 280 (dynamo); gates 105 / 10.5 / 308
    rows = [_row("linear:0.5", 100, 20, 300), _row("dynamo", 150, 10, 280),
            _row("fast", 104, 12.6, 300),  # TTFT and P99 within their gates, TPOT 1.2x its gate
            _row("lean", 126, 10.4, 300),  # TPOT and P99 within, TTFT 1.2x
            _row("worse", 130, 13, 300)]  # beaten by both on both means: off the front  # fmt: skip
    near = sd.nearest(rows)
    assert near["tpot_mean_ms"] == (1.2, "fast") and near["ttft_mean_ms"] == (1.2, "lean")
    assert near["ttft_p99_ms"] is None  # nobody is within both mean gates
    assert [r["rule"] for r in frontier.pareto(rows)] == ["linear:0.5", "fast", "lean", "dynamo"]


def test_the_frontier_at_named_points_runs_only_the_tuned_rules_and_reads_the_others_back():
    # the committed result sets: the 12x sweep seed 1 is in sim_frontier_seeds (its tuned rows) and in
    # sim_diagnosis_seeds_12x (the shipped rules' rows), so nothing is simulated here
    args = frontier.sd.parser().parse_args(["--compare", "linear:0.3", "--reuse", "sim_frontier_seeds"])
    args.points = "sweep_12x|1|0|1"
    rows = frontier.at_points(args)
    stored = [
        r for r in stored_points(SETS.split(","), label_mixed=False) if (r["case"], r["seed"]) == ("sweep_12x", 1)
    ]
    assert [r for r in rows if r["rule"] != "linear:0.3"] == stored
    assert [r["rule"] for r in rows].count("linear:0.3") == 1 and len(stored) > 10
    args.points = "sweep_12x|5|0|1"  # a seed no set holds: said, not simulated
    with pytest.raises(SystemExit, match=r"no stored rows for \[\('sweep_12x', 5, False\)\]"):
        frontier.at_points(args)


def test_real_decisions_are_set_against_the_products_pick_on_the_same_view():
    # `policy_comparison.against_product`: two routed decisions and a pinned one (left out). The first
    # stayed on its cached rank where the product (queue x batch) would have moved it; the second is
    # the product's own pick
    stayed = {"rank": 0, "prompt_len": 1000, "cached": [900, 0], "queued": [4000, 0], "batch": [3, 1], "pinned": False}
    agreed = {"rank": 1, "prompt_len": 500, "cached": [0, 0], "queued": [100, 0], "batch": [2, 0], "pinned": False}
    pinned = {**stayed, "rank": 1, "pinned": True}
    a = against_product([stayed, agreed, pinned])
    # product: (4000 + 100) x 4 = 16,400 against (0 + 1000) x 2 = 2,000 -> rank 1; then rank 1 (500 < 1,800)
    assert (a["decisions"], a["same"]) == (2, 1)
    assert (a["uncached"], a["uncached_product"]) == (100 + 500, 1000 + 500)
    assert (a["queued"], a["queued_product"]) == (4000 + 0, 0 + 0)
    assert (a["batch"], a["batch_product"]) == (3 + 0, 1 + 0)


class _Pick:
    """A rule that takes a given rank: the observer must classify the rank chosen, whatever chose it."""

    name, reads_capacity = "pick", False

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def choose(self, view: RankView, rotation: int) -> Choice:
        return Choice(self.rank, False, [0.0] * len(view.cached))


def test_the_room_estimate_is_noted_for_the_rank_chosen_and_grouped_as_the_rule_treats_it():
    speed = PooledDecodeCost(3)
    speed.prefill_us_per_token = 100.0  # 10,000 tokens a second
    # rank 0 full, the request holding a chunk there; rank 1 full, little cached; rank 2 has room
    view = RankView(prompt_len=9_000, cached=[8_192, 16, 0], queued=[0, 500, 0], running=[4, 4, 1],
                    waiting=[0, 0, 0], kv_tokens=[20_000, 20_000, 1_000], page_size=16, max_kv_tokens=[24_000] * 3,
                    decode_output_tokens=4_000.0, chunk_tokens=8_192)  # fmt: skip
    seen = []
    for rank in (0, 1, 2):
        obs = room_estimate._Observer(_Pick(rank), speed)
        assert obs.choose(view, 0).rank == rank  # the rule decides, the observer only notes
        seen += obs.seen
    # excess 5,000 of 20,000 held over a 4,000-token output: 1,000 tokens (0.1 s); rank 1 less its queue
    assert [(s.group, round(s.estimate_s, 6)) for s in seen] == [("exempt", 0.1), ("priced", 0.05), ("room", 0.0)]
    assert round(seen[1].whole_s, 6) == 0.1  # the same wait with rank 1's queue ahead not taken off
    full = replace(view, kv_tokens=[20_000] * 3, batch=())  # a new view: its figures (the excess) its own
    obs = room_estimate._Observer(_Pick(2), speed)
    obs.choose(full, 0)
    assert obs.seen[0].group == "all_short"
    speed.prefill_us_per_token = 0.0  # not measured yet: nothing to convert with, noted as such
    obs.choose(view, 0)
    assert obs.seen[1] is None


def test_the_rank_correlation_averages_ties():
    assert room_estimate.spearman(np.array([0.0, 0.0, 1.0, 2.0]), np.array([0.0, 0.0, 3.0, 5.0])) == 1.0
    assert room_estimate.spearman(np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0])) == -1.0
    assert room_estimate.spearman(np.array([1.0, 1.0, 1.0]), np.array([1.0, 2.0, 3.0])) is None


def test_the_nuisance_verdict_is_judged_against_the_best_baseline_at_each_delay():
    """At 1 ms "ours" is within 5% of the best baseline's TPOT there (dynamo, 10); at 3 ms the best
    TPOT is 8 (linear) and the same 10.4 is 1.3x: the verdict changes with the delay, and each delay is
    judged against its own best baseline, not the 2 ms one."""

    def at(delay: float, *rows: dict) -> list[dict]:
        return [{**r, "event_delay_s": delay, "rank": {"mixed_chunk": False}} for r in rows]

    rows = at(0.001, _row("linear:0.5", 100, 20, 300), _row("dynamo", 150, 10, 280), _row("ours", 104, 10.4, 300))
    rows += at(0.003, _row("linear:0.5", 100, 8, 300), _row("dynamo", 150, 10, 280), _row("ours", 104, 10.4, 300))
    (found,) = nuisance.verdicts(rows, ["ours"])
    assert found["point"] == "c, seed 0" and sorted(found["over"]) == [0.001, 0.003]
    assert round(found["over"][0.001]["tpot_mean_ms"], 6) == round(1.04 / 1.05, 6)
    assert round(found["over"][0.003]["tpot_mean_ms"], 6) == round(1.3 / 1.05, 6)
    line = nuisance.table([found], rows)[2]
    assert "| 1 of 2 |" in line and "| 104-104 |" in line
    # who meets the bar at each delay, baselines included: at 3 ms linear is best on both means and
    # within 1.1x of dynamo's P99, so it meets the point "ours" misses there
    assert nuisance.met_by(rows)[2] == "| c, seed 0 | ours | linear:0.5 |"
    assert nuisance.summary("ours", [found]) == (
        "- `ours`: meets 0 of 1 points at every delay, 0 at most delays; the verdict changes with the delay on 1."
    )
    # the specs: one run per rule and delay, each carrying its delay in seconds
    specs = nuisance.specs("stress_long_outputs|2|1|1", "kvmul,dynamo", [1.0, 3.0])
    assert [(s["rule"], s["event_delay_s"], s["seed"], s["rank"]["mixed_chunk"]) for s in specs] == [
        ("kvmul", 0.001, 2, True),
        ("kvmul", 0.003, 2, True),
        ("dynamo", 0.001, 2, True),
        ("dynamo", 0.003, 2, True),
    ]
    # a run at another delay is another run: `--reuse` must not take it for the stored 2 ms row
    assert len({sd._key(s) for s in specs}) == 4
    plain = {k: v for k, v in specs[0].items() if k != "event_delay_s"}
    assert sd._key(plain) != sd._key(specs[0]) and "0.001" not in sd._key(plain)
    # ...but a run at the simulator's own delay is the stored run, which `--reuse` takes instead
    assert sd._key({**plain, "event_delay_s": SimConfig.event_delay_s}) == sd._key(plain)
