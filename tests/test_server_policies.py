"""A baseline rule selected with --kvmul-policy runs in the live controller on the same inputs."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
from conftest import _server


@pytest.fixture(scope="module")
def vllm_v1_server(tmp_path_factory, tiny_model):
    yield from _server(tmp_path_factory.mktemp("vllm_v1"), tiny_model, ["--kvmul-policy", "vllm_v1"])


@pytest.mark.server
def test_vllm_v1_rule_routes_cache_blind(vllm_v1_server):
    assert "rule vllm_v1, 2 DP ranks" in vllm_v1_server.server.log_path.read_text()
    rng = random.Random(0)
    prefix = [rng.randrange(3, 2048) for _ in range(300)]
    for i in range(4):
        resp = vllm_v1_server.generate(prefix + [rng.randrange(3, 2048) for _ in range(8)], rid=f"v1-{i}")
        assert resp.status_code == 200, resp.text
    decisions = vllm_v1_server.decisions()
    # cache-blind: siblings of one prefix spread over both ranks (kvmul keeps them on one rank)
    assert {d["rank"] for d in decisions.values()} == {0, 1}
    # the exact cache figures are still computed (and logged) for every rank
    assert any(max(d["cached"]) >= 300 for d in decisions.values())


def test_unknown_policy_is_refused_before_starting():
    proc = subprocess.run(
        [sys.executable, "-m", "sglang_kvmul.launch_server", "--model-path", "x", "--kvmul-policy", "fastest"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "unknown routing rule 'fastest'" in proc.stderr
