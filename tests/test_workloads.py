"""Workload generators: faithful lengths, exact prefix sharing, whole conversations, seeded."""

import json
from itertools import pairwise
from pathlib import Path

import pytest

from sglang_kvmul.sim.workloads import agentic, api, mooncake, summary

TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "mooncake" / "conversation_trace.jsonl"


@pytest.fixture(scope="module")
def trace_rows():
    if not TRACE.exists():
        pytest.fail(f"the shared Mooncake trace is missing: {TRACE}")
    return [json.loads(line) for line in TRACE.open()]


def test_mooncake_lengths_and_prefix_sharing_are_faithful(trace_rows):
    reqs = mooncake(TRACE, fraction=0.05)
    kept_keys = {r.group for r in reqs}
    expected = [
        row
        for row in trace_rows
        if str(row["hash_ids"][1] if len(row["hash_ids"]) > 1 else row["hash_ids"][0]) in kept_keys
    ]
    assert len(reqs) == len(expected) > 300  # whole conversations: every row of a kept key
    for req, row in zip(reqs, expected, strict=True):
        assert len(req.input_ids) == row["input_length"] and req.output_len == max(1, row["output_length"])
    # two rows sharing their first k hash ids share exactly k * 512 leading tokens
    a, b = expected[0], next(r for r in expected[1:] if r["hash_ids"][:2] == expected[0]["hash_ids"][:2])
    k = next(i for i, (x, y) in enumerate(zip(a["hash_ids"], b["hash_ids"], strict=False)) if x != y)
    ra, rb = reqs[expected.index(a)], reqs[expected.index(b)]
    assert ra.input_ids[: k * 512] == rb.input_ids[: k * 512]
    assert ra.input_ids[k * 512 : k * 512 + 512] != rb.input_ids[k * 512 : k * 512 + 512]
    # every conversation starts with the trace's shared system block (hash id 0)
    assert all(r.input_ids[:512] == reqs[0].input_ids[:512] for r in reqs)


def test_mooncake_time_compression_and_scaling(trace_rows):
    full = mooncake(TRACE, fraction=0.05)
    fast = mooncake(TRACE, fraction=0.05, time_compression=10, token_scale=1 / 8)
    assert len(full) == len(fast)
    assert fast[-1].arrival == pytest.approx(full[-1].arrival / 10)
    assert abs(len(fast[5].input_ids) - len(full[5].input_ids) / 8) <= 1


def test_agentic_history_grows_and_shares_the_system_prefix():
    reqs = agentic(sessions=3, turns=4, seed=1)
    by_session = {}
    for r in reqs:
        by_session.setdefault(r.group, []).append(r)
    assert len(by_session) == 3 and all(len(v) == 4 for v in by_session.values())
    for turns in by_session.values():
        for prev, cur in pairwise(turns):
            assert cur.arrival >= prev.arrival
            assert cur.input_ids[: len(prev.input_ids)] == prev.input_ids  # history only grows
    firsts = [v[0].input_ids[:6912] for v in by_session.values()]
    assert firsts[0] == firsts[1] == firsts[2]  # shared system/tool prefix
    assert agentic(sessions=3, turns=4, seed=1)[3].input_ids == reqs[3].input_ids  # seeded


def test_api_few_long_shared_prompts_with_zipf_popularity():
    reqs = api(requests=400, system_prompts=4, seed=2)
    s = summary(reqs)
    assert s["groups"] == 4 and s["input_mean"] == pytest.approx(3100)
    counts = sorted((sum(1 for r in reqs if r.group == g) for g in {r.group for r in reqs}), reverse=True)
    assert counts[0] > 2 * counts[-1]  # Zipf: the first prompt is the most popular
