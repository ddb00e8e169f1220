"""The foundation's routing checks, shared by every way of running kvmul (plugin, patched SGLang)."""

from __future__ import annotations

import random

VOCAB = 2048


def ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, VOCAB) for _ in range(n)]


def check_shared_prefixes_stick_and_unrelated_prompts_spread(server, tag: str = "spread") -> None:
    rng = random.Random(1)
    prefixes = {g: ids(rng, 400) for g in range(6)}
    placement: dict[int, set[int]] = {g: set() for g in prefixes}
    for rep in range(3):
        for g, prefix in prefixes.items():
            server.wait_quiet()  # each request meets an idle cluster: only the cache decides
            resp = server.generate(prefix + ids(rng, 16), rid=f"{tag}-{g}-{rep}")
            assert resp.status_code == 200, resp.text
            meta = resp.json()["meta_info"]
            placement[g].add(meta["dp_rank"])
            if rep > 0:
                assert meta["cached_tokens"] >= 400, (g, rep, meta)
    # every group stayed on one rank, and the groups used both ranks
    assert all(len(ranks) == 1 for ranks in placement.values()), placement
    assert {next(iter(r)) for r in placement.values()} == {0, 1}


def check_predicted_cached_tokens_equal_sglang_reported(server, tag: str = "exact") -> None:
    rng = random.Random(2)
    base = ids(rng, 300)
    other = ids(rng, 200)
    prompts = [
        base + ids(rng, 20),
        base + ids(rng, 20),
        base[:150] + ids(rng, 50),  # diverges inside a cached prefix
        other + ids(rng, 10),
        other,  # fully cached except the last token
        base + ids(rng, 5),
        ids(rng, 64),
    ]
    results = []
    for i, prompt in enumerate(prompts):
        rid = f"{tag}-{i}"
        server.wait_quiet()
        resp = server.generate(prompt, rid=rid)
        assert resp.status_code == 200, resp.text
        results.append((rid, resp.json()["meta_info"]))
    decisions = server.decisions()
    for rid, meta in results:
        d = decisions[rid]
        assert d["rank"] == meta["dp_rank"], (rid, d, meta)
        assert d["predicted_cached"] == meta["cached_tokens"], (rid, d, meta)
    assert sum(meta["cached_tokens"] for _, meta in results) > 0
