"""Attention DP across two "nodes" on this machine (`--tp-size 2 --attn-dp-size 2 --nnodes 2`), node 0
on 127.0.0.1 and node 1 on 127.0.0.2, the same launcher command with only --node-rank and the
node's --host/--port differing: node 1's KV events reach node 0's controller (a controller that
dialled node 0's host for node 1's rank would get none), prefixes stick, predictions are exact.
(The node whose events cannot be reached: test_server_multinode_unreachable.py.)"""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
from conftest import Server
from routing_checks import (
    check_predicted_cached_tokens_equal_sglang_reported,
    check_shared_prefixes_stick_and_unrelated_prompts_spread,
    ids,
)
from two_nodes import two_nodes, wait_metric

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with two_nodes(tmp_path_factory.mktemp("two-nodes")) as server:
        yield server


def test_node_1_events_reach_the_controller_on_node_0(cluster):
    rng = random.Random(41)
    assert cluster.generate(ids(rng, 64), rid="mn-warm", routed_dp_rank=1).status_code == 200
    wait_metric(cluster, "kvmul_event_batches_total", "1", lambda v: v > 0)
    assert cluster.metric("kvmul_stale") == {"0": 0.0, "1": 0.0}
    log = cluster.server.log_path.read_text()
    assert "kvmul: rank 1 (node 1) registered: it publishes on 127.0.0.2" in log


def test_two_nodes_shared_prefixes_stick_and_unrelated_prompts_spread(cluster):
    check_shared_prefixes_stick_and_unrelated_prompts_spread(cluster, tag="mn-spread")


def test_two_nodes_predictions_equal_sglang_reported(cluster):
    check_predicted_cached_tokens_equal_sglang_reported(cluster, tag="mn-exact")
