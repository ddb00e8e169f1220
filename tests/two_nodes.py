"""Attention DP across two "nodes" on this machine (`--tp-size 2 --attn-dp-size 2 --nnodes 2`):
node 0 on 127.0.0.1 and node 1 on 127.0.0.2, the same launcher command with only --node-rank and
the node's --host/--port differing."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from conftest import Server

from sglang_kvmul.harness.local_server import cpu_server_args, start_server
from sglang_kvmul.harness.tiny_model import build
from sglang_kvmul.launch.ports import free_port_range
from sglang_kvmul.serving.settings import KvmulSettings


@contextmanager
def two_nodes(tmp: Path, node1_env: dict[str, str] | None = None) -> Iterator[Server]:
    """Node 0 (controller, HTTP) and node 1 as two launcher processes; yields node 0 and stops both."""
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
        node1.wait_child("sglang::data_parallel_controller", timeout=240)  # its port checks are done
        node0 = start_server(model, [*common, "--node-rank", "0", "--kvmul-metrics-port", str(metrics)],
                             tmp / "node0.log", env=env0, attempts=1)  # fmt: skip
        try:
            yield Server(node0, log, metrics)
        finally:
            node0.stop()
    finally:
        node1.stop()


def wait_metric(server: Server, name: str, rank: str, ok: Callable[[float], bool], timeout: float = 30) -> float:
    """Poll node 0's metric `name` for `rank` until `ok` holds (the events arrive asynchronously)."""
    deadline = time.monotonic() + timeout
    while not ok(value := server.metric(name).get(rank, float("nan"))):
        assert time.monotonic() < deadline, (name, rank, value)
        time.sleep(0.2)  # polling interval
    return value
