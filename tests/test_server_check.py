"""`python -m sglang_kvmul.check` passes on a correctly deployed server and fails (exit 1) on one
whose controller gets no KV events (a real misconfiguration: plain `sglang.launch_server
--load-balance-method kvmul` through the plugin, without `--kv-events-config`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Server

from sglang_kvmul.cpu_compat import cpu_env
from sglang_kvmul.harness.local_server import cpu_server_args, running_server
from sglang_kvmul.launch.ports import free_port_range
from sglang_kvmul.serving.settings import KvmulSettings

pytestmark = pytest.mark.server


def _check(server) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "sglang_kvmul.check", "--url", server.url, "--metrics-url", server.metrics_url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_the_check_passes_on_a_correct_deployment(kvmul_server):
    proc = _check(kvmul_server)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "prefix groups kept on one rank: 6 of 6" in proc.stdout and "OK" in proc.stdout


@pytest.fixture(scope="module")
def blind_server(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path):
    tmp = tmp_path_factory.mktemp("blind")
    metrics_port = free_port_range(1)
    env = {**cpu_env(2), **KvmulSettings(metrics_port=metrics_port).to_env()}
    args = ["--dp-size", "2", "--load-balance-method", "kvmul", *cpu_server_args(16384)]
    with running_server(tiny_model, args, tmp / "server.log", launcher="sglang.launch_server", env=env) as srv:
        yield Server(srv, tmp / "decisions.jsonl", metrics_port)


def test_the_check_fails_when_events_do_not_reach_the_controller(blind_server):
    proc = _check(blind_server)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "NO" in proc.stdout and "FAILED" in proc.stdout
