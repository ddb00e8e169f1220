"""Attention DP across two "nodes" on this machine (`--tp-size 2 --attn-dp-size 2 --nnodes 2`), node 0
on 127.0.0.1 and node 1 on 127.0.0.2, the same launcher command with only --node-rank and the
node's --host/--port differing: node 1's KV events reach node 0's controller (a controller that
dialled node 0's host for node 1's rank would get none), prefixes stick, predictions are exact.
And when node 1's publisher cannot be reached, its rank is stale, counted, and still served."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Server
from routing_checks import (
    check_predicted_cached_tokens_equal_sglang_reported,
    check_shared_prefixes_stick_and_unrelated_prompts_spread,
    ids,
)

from sglang_kvmul.harness.local_server import cpu_server_args, start_server
from sglang_kvmul.harness.tiny_model import build
from sglang_kvmul.launch.ports import free_port_range
from sglang_kvmul.serving.settings import KvmulSettings

pytestmark = pytest.mark.server


def two_nodes(tmp: Path, node1_env: dict[str, str] | None = None) -> Iterator[Server]:
    """Node 0 (controller, HTTP) and node 1 as two launcher processes; yields node 0."""
    model = build("tiny-qwen3")
    dist = free_port_range(1, lo=23000, hi=28000)  # the KV-event ports derive from it: dist + 1000 ...
    metrics = free_port_range(1)
    log = tmp / "decisions.jsonl"
    common = ["--tp-size", "2", "--attn-dp-size", "2", "--nnodes", "2", "--dist-init-addr", f"127.0.0.1:{dist}",
              *cpu_server_args(4096)]  # fmt: skip
    env0 = {"SGLANG_CPU_OMP_THREADS_BIND": "0", **KvmulSettings(decision_log=str(log)).to_env()}
    env1 = {"SGLANG_CPU_OMP_THREADS_BIND": "1", **(node1_env or {})}
    node1 = start_server(model, [*common, "--node-rank", "1"], tmp / "node1.log", env=env1, host="127.0.0.2",
                         wait=False)  # fmt: skip
    try:
        node0 = start_server(model, [*common, "--node-rank", "0", "--kvmul-metrics-port", str(metrics)],
                             tmp / "node0.log", env=env0, attempts=1)  # fmt: skip
        try:
            yield Server(node0, log, metrics)
        finally:
            node0.stop()
    finally:
        node1.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from two_nodes(tmp_path_factory.mktemp("two-nodes"))


def _wait_metric(server: Server, name: str, rank: str, ok, timeout: float = 30) -> float:
    deadline = time.monotonic() + timeout
    while not ok(value := server.metric(name).get(rank, float("nan"))):
        assert time.monotonic() < deadline, (name, rank, value)
        time.sleep(0.2)  # polling interval
    return value


def test_node_1_events_reach_the_controller_on_node_0(cluster):
    rng = random.Random(41)
    assert cluster.generate(ids(rng, 64), rid="mn-warm", routed_dp_rank=1).status_code == 200
    _wait_metric(cluster, "kvmul_event_batches_total", "1", lambda v: v > 0)
    assert cluster.metric("kvmul_stale") == {"0": 0.0, "1": 0.0}
    log = cluster.server.log_path.read_text()
    assert "kvmul: rank 1 (node 1) registered: it publishes on 127.0.0.2" in log


def test_two_nodes_shared_prefixes_stick_and_unrelated_prompts_spread(cluster):
    check_shared_prefixes_stick_and_unrelated_prompts_spread(cluster, tag="mn-spread")


def test_two_nodes_predictions_equal_sglang_reported(cluster):
    check_predicted_cached_tokens_equal_sglang_reported(cluster, tag="mn-exact")


def test_an_unreachable_node_is_stale_counted_and_still_served(tmp_path_factory):
    # node 1's event sockets admit only 127.0.0.9: the controller's subscription is refused, as a
    # firewall between the nodes would refuse it (a fault the two processes cannot show otherwise)
    for server in two_nodes(tmp_path_factory.mktemp("cut-off"), {"SGLANG_KVMUL_EVENT_PEERS": "127.0.0.9"}):
        _wait_metric(server, "kvmul_stale", "1", lambda v: v == 1.0, timeout=60)
        assert server.metric("kvmul_stale")["0"] == 0.0
        rng = random.Random(42)
        for rank in (0, 1):
            resp = server.generate(ids(rng, 64), rid=f"cut-{rank}", routed_dp_rank=rank)
            assert resp.status_code == 200 and resp.json()["meta_info"]["dp_rank"] == rank
        resp = server.generate(ids(rng, 64), rid="cut-routed")
        assert resp.status_code == 200
        deadline = time.monotonic() + 30  # the controller logs it once unreachable_after_s has passed
        while "unreachable; scored by load" not in (text := server.server.log_path.read_text()):
            assert time.monotonic() < deadline
            time.sleep(0.2)  # polling interval
        assert "rank 1's KV events at tcp://127.0.0.2:" in text and "unreachable; scored by load" in text
        assert server.metric_total("kvmul_unreachable_event_streams_total") == 1.0
