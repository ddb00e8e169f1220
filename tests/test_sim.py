"""The simulator: the production router over simulated SGLang ranks (no server needed)."""

import random

from sglang_kvmul.sim.cost import LinearCost, SharedCores
from sglang_kvmul.sim.engine import SimConfig, Simulation
from sglang_kvmul.sim.rank import RankConfig
from sglang_kvmul.sim.workloads import TraceRequest, api


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


def test_snapshot_running_totals_match_the_waiting_queue(monkeypatch):
    """The waiting-queue totals a snapshot reports are kept incrementally (queues run to thousands);
    they must equal a walk of the queue at every snapshot, chunked prompts and admission included.
    The KV-in-use figure counts each page live requests hold once, as SGLang's pool does."""
    from sglang_kvmul.sim.rank import SimRank

    original = SimRank.snapshot
    checked, shared = [], []

    def checked_snapshot(self: SimRank, now: float) -> dict:
        snap = original(self, now)
        walk = sum(len(r.tokens) - r.cached - r.prefilled for r in self.waiting)
        assert snap["num_waiting_uncached_tokens"] == walk
        assert self.waiting_tokens == sum(len(r.tokens) for r in self.waiting)
        # KV in use counts a shared prefix once: the distinct pages that live requests hold
        live = [r for r in (*self.running, *self.prefilling, *self.waiting) if r.admitted]
        held = {id(page) for r in live for page in r.path}
        assert self.cache.locked_pages == len(held)
        shared.append(sum(len(r.path) for r in self.running) - len({id(p) for r in self.running for p in r.path}))
        checked.append(len(self.waiting))
        return snap

    monkeypatch.setattr(SimRank, "snapshot", checked_snapshot)
    work = api(requests=300, system_prompts=6, system_len=300, question_len=80, output_len=6, rate=400.0, seed=7)
    rank = RankConfig(page_size=4, kv_pages=400, chunk_tokens=128, max_running=8, decode_reserve_tokens=8)
    Simulation(SimConfig(ranks=2, rank=rank, rule="round_robin")).run(work)
    assert max(checked) > 20  # queues really built up
    assert max(shared) > 100  # running requests really shared prefix pages


def test_mixed_chunks_keep_decodes_going_through_a_prefill():
    """One rank: a long-output request decoding, then a long prompt arrives. SGLang's default pauses
    the decode for the whole prefill (the stall is the prefill's time); with --enable-mixed-chunk
    the decode makes a token inside each prefill step: less stall, a faster TPOT, the same tokens."""
    rng = random.Random(7)
    work = [
        TraceRequest(0.0, [rng.randrange(3, 5000) for _ in range(32)], 200, ""),
        TraceRequest(0.05, [rng.randrange(3, 5000) for _ in range(6000)], 2, ""),
    ]
    out = {}
    for mixed in (False, True):
        rank = RankConfig(page_size=16, kv_pages=2000, chunk_tokens=1024, mixed_chunk=mixed)
        sim = Simulation(SimConfig(ranks=1, rank=rank, rule="round_robin"))
        first, _ = sorted(sim.run(work), key=lambda r: r.rid)
        out[mixed] = first
    plain, mixed = out[False], out[True]
    assert plain.generated == mixed.generated == 200
    # six 1024-token chunks: plain, each pauses the decode for the chunk's whole step; mixed, the
    # decode makes a token in each, so it loses only the step's excess over a decode step
    assert 0 < mixed.stall < plain.stall, (plain.stall, mixed.stall)
    assert mixed.finish - mixed.first_token < plain.finish - plain.first_token


def test_kv_wait_is_the_time_a_request_waits_for_pages_at_the_queue_head():
    """A pool with room for one long request at a time: the second waits at the queue head from its
    first failed admission until the first finishes and frees its pages; with room for both it never waits."""
    rng = random.Random(9)
    work = [TraceRequest(0.0, [rng.randrange(3, 5000) for _ in range(900)], 50, "") for _ in range(2)]
    waits = {}
    for pages in (80, 400):
        rank = RankConfig(page_size=16, kv_pages=pages, chunk_tokens=4096, decode_reserve_tokens=64)
        first, second = sorted(
            Simulation(SimConfig(ranks=1, rank=rank, rule="round_robin")).run(work), key=lambda r: r.rid
        )
        waits[pages] = (first, second)
    first, second = waits[80]
    assert first.kv_wait == 0.0 and second.kv_wait > 0
    # it queued behind the first one's prefill step, then waited for pages until the first finished
    assert 0 < second.kv_blocked_at < second.admitted_at == first.finish
    assert abs(second.kv_wait - (second.admitted_at - second.kv_blocked_at)) < 1e-9
    assert all(r.kv_wait == 0.0 for r in waits[400])


def test_kv_blocked_counts_the_wait_behind_a_queue_head_with_no_room():
    """Three long requests and room for one at a time: the third waits behind the second while the
    second waits for pages, then waits for pages itself; its `kv_blocked` is both spans, which the
    head-only `kv_wait` misses (the diagnosis's "behind KV wait" column)."""
    rng = random.Random(9)
    work = [TraceRequest(0.0, [rng.randrange(3, 5000) for _ in range(900)], 50, "") for _ in range(3)]
    runs = {}
    for pages in (80, 400):
        rank = RankConfig(page_size=16, kv_pages=pages, chunk_tokens=4096, decode_reserve_tokens=64)
        sim = Simulation(SimConfig(ranks=1, rank=rank, rule="round_robin"))
        runs[pages] = sorted(sim.run(work), key=lambda r: r.rid)
    first, second, third = runs[80]
    assert first.kv_blocked == first.kv_wait == 0.0
    assert second.kv_wait > 0 and abs(second.kv_blocked - second.kv_wait) < 1e-9
    assert third.kv_wait > 0
    assert abs(third.kv_blocked - (second.kv_wait + third.kv_wait)) < 1e-9, (third.kv_blocked, second.kv_wait)
    assert all(r.kv_blocked == 0.0 for r in runs[400])


def test_shared_cores_share_the_time_of_overlapping_steps():
    """Two ranks on shared cores, a step twice as slow while the other rank is busy (processor
    sharing): two equal prefills, the second starting halfway through the first. The first does half
    its work alone, the rest at half speed (ends at 1.5 T); the second does half at half speed, half
    alone (ends at 2 T). With every factor 1 the timeline is that of independent ranks."""
    rng = random.Random(11)
    prompt = [rng.randrange(3, 5000) for _ in range(500)]
    cost = LinearCost()
    alone = cost.prefill_s(len(prompt), 0, 1)
    work = [TraceRequest(0.0, prompt, 1, ""), TraceRequest(alone / 2, prompt[::-1], 1, "")]
    rank = RankConfig(page_size=16, kv_pages=400)

    def run(cores: SharedCores | None) -> list[float]:
        cfg = SimConfig(ranks=2, rank=rank, rule="round_robin", event_delay_s=0.0, shared_cores=cores)
        return [r.first_token for r in sorted(Simulation(cfg, cost).run(work), key=lambda r: r.rid)]

    first, second = run(SharedCores(2.0, 2.0, 2.0, 2.0))
    assert abs(first - 1.5 * alone) < 1e-9 and abs(second - 2.0 * alone) < 1e-9, (first, second, alone)
    assert run(SharedCores(1.0, 1.0, 1.0, 1.0)) == run(None) == [alone, 1.5 * alone]
    # a prefill slowed only by the other's decodes: the factor used is prefill_with_decode
    assert SharedCores(2.0, 3.0, 4.0, 5.0).slowdown(True, 0, 1) == 3.0
    assert SharedCores(2.0, 3.0, 4.0, 5.0).slowdown(False, 1, 1) == 1.0 + 4.0 + 3.0


def test_shared_cores_keep_every_request_and_its_tokens():
    """Rates re-timed on every step start and end must not lose or repeat a step: the same tokens as
    independent ranks, every request finished, and no request faster than with cores of its own."""
    work = api(requests=120, system_prompts=4, system_len=300, question_len=20, output_len=30, rate=8.0, seed=5)
    out = {}
    for cores in (None, SharedCores(1.8, 1.5, 3.0, 6.0)):
        cfg = SimConfig(ranks=2, rank=RankConfig(page_size=16, kv_pages=600), rule="round_robin", shared_cores=cores)
        out[cores is None] = sorted(Simulation(cfg).run(work), key=lambda r: r.rid)
    own, shared = out[True], out[False]
    assert [r.generated for r in own] == [r.generated for r in shared] == [r.output_len for r in own]
    assert all(s.finish >= o.finish - 1e-9 for s, o in zip(shared, own, strict=True))
    assert sum(s.finish - s.arrival for s in shared) > 1.2 * sum(o.finish - o.arrival for o in own)


def test_cpu_attention_prices_the_cached_prefix_as_new_and_batches_per_request():
    """SGLang's torch_native backend pads a prefill's query over its cached prefix, so its attention
    grows with the whole sequence squared (fit_cpu_cost picks that model from measurements); a GPU
    kernel's grows with the new tokens times the context. Either way a batch of two equal requests
    costs twice one request's attention, with the cached context summed over the batch."""
    gpu, cpu = LinearCost(), LinearCost(attn_whole_sequence=True)
    c = gpu.attn_token_ctx_s
    assert abs((gpu.prefill_s(100, 3000, 1) - gpu.prefill_s(100, 0, 1)) - c * 100 * 3000) < 1e-12
    assert abs((cpu.prefill_s(100, 3000, 1) - cpu.prefill_s(100, 0, 1)) - c * (3100**2 - 100**2) / 2) < 1e-12
    for cost in (gpu, cpu):
        attn_one = cost.prefill_s(100, 3000, 1) - cost.prefill_fixed_s - cost.prefill_token_s * 100
        attn_two = cost.prefill_s(200, 6000, 2) - cost.prefill_fixed_s - cost.prefill_token_s * 200
        assert abs(attn_two - 2 * attn_one) < 1e-12
    extra = {cost: cost.prefill_s(64, 4000, 1) - cost.prefill_s(64, 0, 1) for cost in (gpu, cpu)}
    assert extra[cpu] > 30 * extra[gpu]  # (4064^2 - 64^2) / 2 against 64 * 4000


def test_half_speed_ranks_measure_twice_as_slow_and_equal_ranks_not_at_all():
    """`marginal_timed` over simulated ranks: two of four at half speed measure about twice as slow
    as the others from what the router learns (decode steps and prefill tokens, as SGLang reports
    them), and the rule decides in time; with four equal ranks the slowdown stays empty and no
    decision is made in time."""
    work = api(requests=800, system_prompts=16, system_len=600, question_len=120, output_len=40, rate=40.0, seed=2)
    rank = RankConfig(page_size=16, kv_pages=4000, decode_reserve_tokens=16)
    measured = {}
    for speeds in ((1.0,) * 4, (1.0, 1.0, 0.5, 0.5)):
        cfg = SimConfig(ranks=4, rank=rank, rule="marginal_timed")
        sim = Simulation(cfg, speeds=list(speeds))
        assert len(sim.run(work)) == 800
        measured[speeds] = (list(sim.router.decode_cost.rank_slowdown), dict(sim.router.rule.trips))
    assert measured[(1.0,) * 4] == ([], {})
    slow, trips = measured[(1.0, 1.0, 0.5, 0.5)]
    assert len(slow) == 4 and min(slow[2:]) > 1.8 * max(slow[:2]) and trips["timed"] > 0
