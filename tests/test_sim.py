"""The simulator: the production router over simulated SGLang ranks (no server needed)."""

import random

from sglang_kvmul.sim.engine import SimConfig, Simulation
from sglang_kvmul.sim.rank import RankConfig
from sglang_kvmul.workloads import TraceRequest, api


def shared_prefix_requests(n: int, gap_s: float, seed: int = 0) -> list[TraceRequest]:
    rng = random.Random(seed)
    prefixes = [[rng.randrange(3, 5000) for _ in range(rng.randrange(40, 200))] for _ in range(5)]
    out = []
    for i in range(n):
        p = rng.choice(prefixes)
        out.append(TraceRequest(i * gap_s, p + [rng.randrange(3, 5000) for _ in range(rng.randrange(1, 60))], 4, ""))
    return out


def test_every_request_finishes_once_and_sequential_predictions_are_exact():
    """Spaced-out arrivals (each finishes first), small KV pools so eviction happens: the router's
    predicted cached tokens equal what the simulated scheduler takes from its cache."""
    rank = RankConfig(page_size=4, kv_pages=120, chunk_tokens=64, decode_reserve_tokens=8)
    sim = Simulation(SimConfig(ranks=3, rank=rank, event_delay_s=0.001))
    reqs = sim.run(shared_prefix_requests(150, gap_s=5.0))
    assert len({r.rid for r in reqs}) == 150 and all(r.finish is not None and r.first_token <= r.finish for r in reqs)
    assert all(r.predicted_cached == r.cached for r in reqs)
    assert sum(r.cached for r in reqs) > 0 and sum(r.cache.evicted_pages for r in sim.ranks) > 0


def test_kvmul_keeps_prefix_groups_together_where_load_only_scatters_them():
    work = api(requests=200, system_prompts=8, system_len=400, question_len=20, output_len=8, rate=20.0, seed=3)
    hit = {}
    for rule in ("kvmul", "load_only"):
        cfg = SimConfig(ranks=4, rank=RankConfig(page_size=16, kv_pages=60, decode_reserve_tokens=16), rule=rule)
        reqs = Simulation(cfg).run(work)
        hit[rule] = sum(r.cached for r in reqs) / sum(len(r.tokens) for r in reqs)
    assert hit["kvmul"] > hit["load_only"] + 0.1, hit


def test_fused_decode_blocks_give_the_step_by_step_timeline():
    """Decode runs taken as one block must change nothing but the number of events: with a rule
    blind to load (round_robin), every request's first token and finish are bit-identical."""
    work = api(requests=120, system_prompts=4, system_len=300, question_len=20, output_len=40, rate=8.0, seed=5)
    runs = {}
    for fuse in (True, False):
        cfg = SimConfig(ranks=3, rank=RankConfig(page_size=16, kv_pages=400), rule="round_robin", fuse_decode=fuse)
        sim = Simulation(cfg)
        reqs = sim.run(work)
        runs[fuse] = (
            [(r.rank, r.first_token, r.finish) for r in reqs],
            sum(r.steps for r in sim.ranks),
            sim.step_events,
        )
    assert runs[True][0] == runs[False][0]
    assert runs[True][1] == runs[False][1]  # the step counter counts every decode step
    assert runs[True][2] < runs[False][2] / 2  # ... in far fewer events
