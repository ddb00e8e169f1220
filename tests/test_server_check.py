"""`python -m sglang_kvmul.check` passes on a correctly deployed server and fails (exit 1) on one
whose KV events do not reach the controller (a real misconfiguration: the null publisher)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import _server

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
    extra = ["--load-balance-method", "kvmul", "--kv-events-config", '{"publisher": "null"}']
    yield from _server(tmp_path_factory.mktemp("blind"), tiny_model, extra)


def test_the_check_fails_when_events_do_not_reach_the_controller(blind_server):
    proc = _check(blind_server)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "NO" in proc.stdout and "FAILED" in proc.stdout
