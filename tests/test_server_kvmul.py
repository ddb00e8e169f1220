"""Integration tests against a REAL SGLang 0.5.23 server on CPU, dp=2, under the kvmul controller.

Requests are sent one at a time. A prompt's blocks are published by SGLang right after its
prefill, while the response still needs 8 decode steps, so the controller has the events before
the next request arrives.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from routing_checks import (
    check_predicted_cached_tokens_equal_sglang_reported,
    check_shared_prefixes_stick_and_unrelated_prompts_spread,
    ids,
)

pytestmark = pytest.mark.server


def test_launcher_selects_kvmul_with_loopback_events(kvmul_server):
    info = requests.get(kvmul_server.url + "/server_info", timeout=10).json()
    assert info["load_balance_method"] == "kvmul"
    assert info["kv_events"]["endpoint_host"] == "127.0.0.1"
    assert info["kv_events"]["dp_size"] == 2
    # the router bounds waits by the chunk SGLang's schedulers take (its resolved chunked_prefill_size)
    assert info["chunked_prefill_size"] > 0
    assert kvmul_server.metric_total("kvmul_prefill_chunk_tokens") == info["chunked_prefill_size"]


def test_shared_prefixes_stick_and_unrelated_prompts_spread(kvmul_server):
    check_shared_prefixes_stick_and_unrelated_prompts_spread(kvmul_server)


def test_predicted_cached_tokens_equal_sglang_reported(kvmul_server):
    check_predicted_cached_tokens_equal_sglang_reported(kvmul_server)


def test_flush_cache_is_broadcast_and_clears_the_mirrors(kvmul_server):
    rng = random.Random(3)
    prompt = ids(rng, 200)
    assert kvmul_server.generate(prompt, rid="flush-0").status_code == 200
    assert kvmul_server.generate(prompt, rid="flush-1").json()["meta_info"]["cached_tokens"] == 199
    assert requests.post(kvmul_server.url + "/flush_cache", timeout=30).status_code == 200
    # The ranks publish AllBlocksCleared after answering the flush: wait for the controller to have
    # applied it (its mirror sizes, read from the metrics), with a deadline.
    deadline = time.monotonic() + 30
    while any(v > 0 for v in kvmul_server.metric("kvmul_mirror_tokens").values()):
        assert time.monotonic() < deadline, "the flush's AllBlocksCleared never reached the controller"
    meta = kvmul_server.generate(prompt, rid="flush-2").json()["meta_info"]
    assert meta["cached_tokens"] == 0
    assert kvmul_server.decisions()["flush-2"]["predicted_cached"] == 0


def test_routed_dp_rank_is_honoured_and_invalid_rank_is_a_request_error(kvmul_server):
    rng = random.Random(4)
    for rank in (0, 1):
        meta = kvmul_server.generate(ids(rng, 50), rid=f"pin-{rank}", routed_dp_rank=rank).json()["meta_info"]
        assert meta["dp_rank"] == rank
        assert kvmul_server.decisions()[f"pin-{rank}"]["pinned"] is True
    for bad in (2, -1, 99):
        resp = kvmul_server.generate(ids(rng, 50), rid=f"bad-{bad}", routed_dp_rank=bad)
        assert resp.status_code == 400, resp.text
        assert "routed_dp_rank" in resp.text
    # the server keeps serving
    assert kvmul_server.generate(ids(rng, 50), rid="after-bad").status_code == 200


def test_batch_requests_and_health_checks_are_dispatched(kvmul_server):
    rng = random.Random(5)
    prefix = ids(rng, 300)
    body = {
        "input_ids": [prefix + ids(rng, 10) for _ in range(4)],
        "sampling_params": {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True},
    }
    resp = requests.post(kvmul_server.url + "/generate", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    assert len(resp.json()) == 4
    assert requests.get(kvmul_server.url + "/health_generate", timeout=60).status_code == 200


def test_prometheus_metrics_describe_the_decisions(kvmul_server):
    from prometheus_client.parser import text_string_to_metric_families

    rng = random.Random(6)
    prefix = ids(rng, 300)
    for i in range(3):
        assert kvmul_server.generate(prefix + ids(rng, 8), rid=f"metrics-{i}").status_code == 200
    text = requests.get(kvmul_server.metrics_url, timeout=10).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, s.labels.get("rank"))] = s.value
    booked = kvmul_server.decision_lines()  # routed by the rule, or pinned (other tests reuse rids)
    assert samples[("kvmul_decisions_total", None)] == len(booked)
    assert sum(samples[("kvmul_routed_requests_total", r)] for r in "01") == len(booked)
    predicted = sum(d["predicted_cached"] for d in booked)
    assert sum(samples[("kvmul_predicted_hit_tokens_total", r)] for r in "01") == predicted
    assert samples[("kvmul_stale", "0")] == 0 and samples[("kvmul_stale", "1")] == 0
    assert samples[("kvmul_event_batches_total", "0")] + samples[("kvmul_event_batches_total", "1")] > 0
    assert samples[("kvmul_mirror_tokens", "0")] + samples[("kvmul_mirror_tokens", "1")] >= 300
    assert samples[("kvmul_malformed_messages_total", "0")] == 0
    assert samples[("kvmul_orphan_blocks_total", "0")] == samples[("kvmul_orphan_blocks_total", "1")] == 0
    # the default rule reports when its room term ran: never here, the pools have room (the speed
    # terms, `timed`, may: the two CPU ranks share two cores)
    trips = _trips(kvmul_server)
    assert trips["room_priced"] == trips["room_exempt"] == 0


def test_sglang_decode_step_times_reach_the_router(kvmul_server):
    """SGLang's load snapshots carry its decode step-time moments (`decode_moments`); the router
    pools them (`core.decode_cost`, read by `marginal_decode`) and exports the count."""
    rng = random.Random(8)
    for i in range(2):
        assert kvmul_server.generate(ids(rng, 64), rid=f"decode-moments-{i}", max_new_tokens=32).status_code == 200
    deadline = time.monotonic() + 30
    while (steps := kvmul_server.metric_total("kvmul_decode_steps_measured")) < 16:  # snapshots arrive on their own
        assert time.monotonic() < deadline, f"the router saw {steps} decode steps after 64 were run"
        time.sleep(0.2)  # polling interval


def _measure_decode_costs(server, tag: str) -> None:
    """Run enough to pass the thresholds for a trusted estimate (pooled decode steps, prefilled
    tokens), then wait for the snapshots that carry it."""
    rng = random.Random(9)
    for i in range(6):  # 6 x 3,000 prefilled tokens and 6 x 48 decode steps: past both thresholds
        resp = server.generate(ids(rng, 3000), rid=f"{tag}-{i}", max_new_tokens=48)
        assert resp.status_code == 200, resp.text
    deadline = time.monotonic() + 30
    while server.metric_total("kvmul_decode_output_tokens") == 0:
        assert time.monotonic() < deadline, "no output duration after 288 decode steps and 18k prefilled tokens"
        time.sleep(0.2)  # polling interval: snapshots arrive on their own


def test_measured_decode_costs_are_exported(kvmul_server):
    """Past the thresholds for a trusted estimate (pooled decode steps, prefilled tokens), the
    figures the marginal rules price with are served as gauges: the mean decode batch and one
    output's duration on the clock (what `marginal_turnover` discounts a queued batch by)."""
    _measure_decode_costs(kvmul_server, "decode-cost")
    assert kvmul_server.metric_total("kvmul_decode_batch_mean") >= 1.0  # every measured step decodes a request
    # one output (~48 steps) lasts longer on the clock than one step of it
    assert kvmul_server.metric_total("kvmul_decode_steps_per_request") > 1.0


def test_finished_outputs_reach_the_router_each_counted_once(kvmul_server):
    """Each scheduler counts its finished outputs (`serving.fresh_outputs`, appended to SGLang's load
    snapshot); the router pools them into `marginal_fresh`'s weight, (Obar - 1) x E[1 / (O - 1)].
    Requests of 2 and 24 output tokens: the pooled count, mean and mean inverse move exactly by
    theirs, and the weight is the formula's over everything served."""
    names = ("outputs_measured", "output_mean", "output_inverse_mean")
    before = {k: kvmul_server.metric_total(f"kvmul_{k}") for k in names}
    rng = random.Random(11)
    outputs = [2, 24] * 20
    for i, out in enumerate(outputs):
        resp = kvmul_server.generate(ids(rng, 40), rid=f"outputs-{i}", max_new_tokens=out)
        assert resp.status_code == 200 and resp.json()["meta_info"]["completion_tokens"] == out
    n0 = before["outputs_measured"]
    n = n0 + len(outputs)
    deadline = time.monotonic() + 30
    while kvmul_server.metric_total("kvmul_outputs_measured") < n:  # snapshots arrive on their own
        assert time.monotonic() < deadline, "the finished outputs never reached the router"
        time.sleep(0.2)  # polling interval
    assert kvmul_server.metric_total("kvmul_outputs_measured") == n  # none counted twice
    mean = (before["output_mean"] * n0 + sum(outputs)) / n
    inverse = (before["output_inverse_mean"] * n0 + sum(1 / (o - 1) for o in outputs)) / n
    assert kvmul_server.metric_total("kvmul_output_mean") == pytest.approx(mean)
    assert kvmul_server.metric_total("kvmul_output_inverse_mean") == pytest.approx(inverse)
    # n >= 40 >= MIN_FINISHED_FOR_SPREAD: the weight is measured, and far above 1 with 2- and 24-token outputs
    weight = kvmul_server.metric_total("kvmul_fresh_pause_weight")
    assert weight == pytest.approx(max(1.0, (mean - 1) * inverse)) and weight > 1.5


def test_chunked_prefill_and_logprob_cap_are_predicted_exactly(kvmul_server):
    """A prompt longer than the chunked-prefill budget (4096) is prefilled in chunks; a logprob
    request caps reuse at logprob_start_len. The prediction must equal SGLang's report for both."""
    rng = random.Random(7)
    long_prompt = ids(rng, 4600)
    checks = [
        ("chunked-0", long_prompt, {}),
        ("chunked-1", long_prompt[:4500] + ids(rng, 40), {}),
        ("logprob-0", long_prompt[:1000] + ids(rng, 10), {"return_logprob": True, "logprob_start_len": 300}),
    ]
    reported, home = {}, None
    for rid, prompt, extra in checks:
        # pinned after the first: this checks the prediction, not the routing (a sequential client
        # can outrun the load snapshot that shows its previous request done)
        pin = {} if home is None else {"routed_dp_rank": home}
        resp = kvmul_server.generate(prompt, rid=rid, max_new_tokens=4, **extra, **pin)
        assert resp.status_code == 200, resp.text
        reported[rid] = resp.json()["meta_info"]["cached_tokens"]
        home = resp.json()["meta_info"]["dp_rank"] if home is None else home
    decisions = kvmul_server.decisions()
    for rid, _, _ in checks:
        assert decisions[rid]["predicted_cached"] == reported[rid], (rid, decisions[rid], reported[rid])
    assert reported["chunked-1"] == 4500 and reported["logprob-0"] == 300


def test_session_requests_stay_on_one_rank(kvmul_server):
    """Open sessions are broadcast to every rank, but a session's history lives on the rank that
    served its first request: later turns must follow it, whatever the cache elsewhere says."""
    resp = requests.post(kvmul_server.url + "/open_session", json={"capacity_of_str_len": 100000}, timeout=30)
    assert resp.status_code == 200, resp.text
    sid = resp.json()
    rng = random.Random(8)
    ranks = []
    parent = None
    for turn in range(4):
        # unrelated prompts: without stickiness their ties would rotate over both ranks
        body = {"session_params": {"id": sid, "rid": parent}}
        resp = kvmul_server.generate(ids(rng, 60), rid=f"session-{turn}", **body)
        assert resp.status_code == 200, resp.text
        ranks.append(resp.json()["meta_info"]["dp_rank"])
        parent = f"session-{turn}"
    assert len(set(ranks)) == 1, ranks
    closed = requests.post(kvmul_server.url + "/close_session", json={"session_id": sid}, timeout=30)
    assert closed.status_code == 200, closed.text


def test_kv_events_reach_only_the_controller_address(kvmul_server):
    """The launcher restricts the publishers (ZAP) to 127.0.0.1: a subscriber connecting from
    127.0.0.3 gets neither live events nor a replay, while one from 127.0.0.1 gets both."""
    import json

    import zmq

    cfg = json.loads(requests.get(kvmul_server.url + "/server_info", timeout=10).json()["kv_events_config"])
    pub = cfg["endpoint"].replace("tcp://", "")
    replay = cfg["replay_endpoint"].replace("tcp://", "")
    ctx = zmq.Context()
    try:
        subs = {}
        for src in ("127.0.0.1", "127.0.0.3"):
            sub = ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.connect(f"tcp://{src}:0;{pub}")  # rank 0's publisher, from source address `src`
            subs[src] = sub
        rng = random.Random(31)
        deadline = time.monotonic() + 30
        while not subs["127.0.0.1"].poll(200):  # slow joiner: keep making events until one arrives
            assert time.monotonic() < deadline, "the allowed subscriber never received an event"
            kvmul_server.generate(ids(rng, 40), rid=f"privacy-{time.monotonic()}", routed_dp_rank=0)
        kvmul_server.generate(ids(rng, 40), rid="privacy-last", routed_dp_rank=0)
        assert subs["127.0.0.1"].poll(5000)
        assert not subs["127.0.0.3"].poll(2000), "a subscriber from 127.0.0.3 received KV events"
        for src, expect in (("127.0.0.1", True), ("127.0.0.3", False)):
            dealer = ctx.socket(zmq.DEALER)
            dealer.connect(f"tcp://{src}:0;{replay}")
            dealer.send_multipart([b"", (0).to_bytes(8, "big", signed=True)])
            assert bool(dealer.poll(3000)) is expect, src
    finally:
        ctx.destroy(linger=0)


def _trips(server) -> dict[str, float]:
    return server.metric("kvmul_rule_trips_total", label="trip")


def test_room_term_spares_a_cached_session_and_prices_a_full_pool_for_a_new_prompt(kvmul_server):
    """The default rule's room term on the real server (it never runs in the tests above: their pools
    have room). A long request pinned to rank 0 holds over half its pool. Then (1) a session
    holding that prompt (a chunk or more of its own) and too long to fit beside it stays on rank 0
    unpriced (`room_exempt`), and (2) a new prompt too long for rank 0 but not for rank 1 has its
    wait for pages priced (`room_priced`) and goes to rank 1. Must run after the decode costs are
    measured (the term needs one output's duration), here by `_measure_decode_costs`. A short
    request pinned to rank 1 decodes alongside, so both ranks price the same decode batch: the
    measured decode cost D (which earlier tests leave anywhere from hundreds to thousands of prefill
    tokens) then cancels out, and the decisions turn on the prefill and room terms this test is about."""
    if kvmul_server.metric_total("kvmul_decode_output_tokens") == 0:
        _measure_decode_costs(kvmul_server, "room-warm")
    kvmul_server.wait_quiet()
    info = requests.get(kvmul_server.url + "/server_info", timeout=10).json()
    chunk, cap = info["chunked_prefill_size"], info["max_total_tokens"]
    rng = random.Random(10)
    held = ids(rng, max(chunk, cap // 2) + 300)  # over half the pool, and a chunk or more
    # the new prompt nearly fills an empty pool, so beside the held one its excess is most of what
    # rank 0 holds and its wait most of one output's duration L, whatever L this machine measures
    session, fresh = held + ids(rng, 600), ids(rng, cap - 1000)
    assert len(held) + len(session) > cap and len(held) + len(fresh) > cap >= len(session) + 300
    before = _trips(kvmul_server)
    with ThreadPoolExecutor(3) as pool:
        long = pool.submit(kvmul_server.generate, held, "room-held", 400, 300, routed_dp_rank=0)
        # short, so rank 1 keeps room for the fresh prompt; longer output, so it outlasts the probes
        filler = pool.submit(kvmul_server.generate, ids(rng, 32), "room-filler", 600, 300, routed_dp_rank=1)
        # until rank 0's cache holds the prompt (its events confirmed) while both ranks decode
        deadline = time.monotonic() + 120
        while not (
            kvmul_server.decisions().get("room-held")
            and kvmul_server.metric("kvmul_inflight_prompts").get("0") == 0
            and kvmul_server.metric("kvmul_batch_size").get("0", 0) >= 1
            and kvmul_server.metric("kvmul_batch_size").get("1", 0) >= 1
        ):
            assert not long.done(), long.result().text
            assert not filler.done(), filler.result().text
            assert time.monotonic() < deadline, "the pinned requests' prefills never reached the mirror"
            time.sleep(0.05)  # polling interval
        assert kvmul_server.generate(session, rid="room-session").status_code == 200
        exempt = _trips(kvmul_server)
        # until the session's prefill has left rank 0's queue (the queue ahead is taken off the wait)
        deadline = time.monotonic() + 60
        while kvmul_server.metric("kvmul_queued_uncached_tokens").get("0", 0) > 0:
            assert time.monotonic() < deadline, "rank 0's queue never drained"
            time.sleep(0.05)  # polling interval
        probe = pool.submit(kvmul_server.generate, fresh, "room-fresh")
        while "room-fresh" not in kvmul_server.decisions():  # routed (logged) before it is prefilled
            assert not probe.done(), probe.result().text
            time.sleep(0.05)  # polling interval
        assert not long.done() and not filler.done(), "a pinned request ended before both probes were routed"
        d_tokens = kvmul_server.metric_total("kvmul_decode_tokens_per_request")
        assert probe.result().status_code == 200 and long.result().status_code == 200
        assert filler.result().status_code == 200
        after = _trips(kvmul_server)
    d = kvmul_server.decisions()
    ses = d["room-session"]
    why = (ses, d.get("room-held"), d.get("room-filler"), exempt, before, f"D={d_tokens:.0f}")
    assert ses["rank"] == 0 and ses["predicted_cached"] >= len(held) - 16, why
    assert exempt["room_exempt"] == before["room_exempt"] + 1 and exempt["room_priced"] == before["room_priced"]
    assert d["room-fresh"]["rank"] == 1
    assert after["room_priced"] == before["room_priced"] + 1 and after["room_exempt"] == exempt["room_exempt"]


def _vary_decode_batches(server, tag: str) -> None:
    """Until D is measured: past the thresholds (`_measure_decode_costs`), then requests decoding
    together with outputs of different lengths on each rank, so the batches shrink step by step and
    the step time's slope on batch size can be fitted (sequential requests all decode at batch 1)."""
    if server.metric_total("kvmul_decode_output_tokens") == 0:
        _measure_decode_costs(server, f"{tag}-warm")
    rng = random.Random(12)
    for attempt in range(3):
        if server.metric_total("kvmul_decode_tokens_per_request") > 0:
            return
        with ThreadPoolExecutor(6) as pool:
            calls = [
                pool.submit(server.generate, ids(rng, 64), f"{tag}-{attempt}-{rank}-{n}", n, routed_dp_rank=rank)
                for rank in (0, 1)
                for n in (16, 32, 64)
            ]
            assert all(c.result().status_code == 200 for c in calls)
        deadline = time.monotonic() + 10
        while server.metric_total("kvmul_decode_tokens_per_request") == 0 and time.monotonic() < deadline:
            time.sleep(0.2)  # polling interval: snapshots arrive on their own
    assert server.metric_total("kvmul_decode_tokens_per_request") > 0, "no decode cost after batches of 3, 2, 1"


def test_default_rule_prices_a_shared_system_prompt_by_its_stem(kvmul_server):
    """The default's stem term on the real server, its inputs SGLang's own: the stem from the mirror
    of the ranks' KV events, the room from their pool figures, D from their step times. Two
    questions pinned to rank 0 after one system prompt make that prompt a stem (the cache branches
    there). A third question's whole hit is the stem, every pool has room and D is measured, so the
    stem term prices its decision: one `shared_stem` trip. A turn that extends a prompt cached once
    (a session's own context, no branch) is priced as `marginal_room_timed` prices it: none."""
    _vary_decode_batches(kvmul_server, "stem-d")
    rng = random.Random(13)
    system, context = ids(rng, 600), ids(rng, 600)
    questions = [[3 + i, *ids(rng, 20)] for i in range(3)]  # first tokens differ: the cache branches
    for i in range(2):
        resp = kvmul_server.generate(system + questions[i], rid=f"stem-q{i}", routed_dp_rank=0)
        assert resp.status_code == 200, resp.text
    assert kvmul_server.generate(context, rid="stem-own", routed_dp_rank=0).status_code == 200
    deadline = time.monotonic() + 30
    while kvmul_server.metric("kvmul_inflight_prompts").get("0", 0) > 0:  # all three in rank 0's mirror
        assert time.monotonic() < deadline, "the pinned prompts' events never reached the mirror"
        time.sleep(0.05)  # polling interval
    kvmul_server.wait_quiet()
    before = _trips(kvmul_server)
    assert kvmul_server.generate(system + questions[2], rid="stem-q2").status_code == 200
    priced = _trips(kvmul_server)
    assert kvmul_server.generate(context + ids(rng, 20), rid="stem-own-turn").status_code == 200
    after = _trips(kvmul_server)
    d = kvmul_server.decisions()
    assert d["stem-q2"]["cached"][0] == len(system) and d["stem-own-turn"]["cached"][0] == len(context)
    assert priced["shared_stem"] == before["shared_stem"] + 1, (d["stem-q2"], before, priced)
    assert after["shared_stem"] == priced["shared_stem"], d["stem-own-turn"]
