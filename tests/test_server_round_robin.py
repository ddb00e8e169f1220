"""A stock SGLang method through our launcher behaves as stock: round-robin, no kvmul decisions."""

from __future__ import annotations

import random

import pytest
import requests

pytestmark = pytest.mark.server


def test_round_robin_still_works_through_our_launcher(round_robin_server):
    info = requests.get(round_robin_server.url + "/server_info", timeout=10).json()
    assert info["load_balance_method"] == "round_robin"
    rng = random.Random(0)
    prefix = [rng.randrange(3, 2048) for _ in range(200)]
    ranks = []
    for i in range(6):
        resp = round_robin_server.generate(prefix + [rng.randrange(3, 2048) for _ in range(8)], rid=f"rr-{i}")
        assert resp.status_code == 200, resp.text
        ranks.append(resp.json()["meta_info"]["dp_rank"])
    # strict alternation, blind to the shared prefix
    assert ranks in ([0, 1] * 3, [1, 0] * 3), ranks
    assert round_robin_server.decisions() == {}
