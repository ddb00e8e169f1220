"""A rank killed under load (SIGKILL of `scheduler_DP1`, as the OOM killer would): no request hangs,
the other rank keeps serving, the metrics and `/health` say which rank is down. Stock SGLang 0.5.23 hangs here
for ever (its controller blocks sending to the dead rank)."""

from __future__ import annotations

import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import requests
from conftest import _server
from routing_checks import ids

pytestmark = pytest.mark.server
HUNG_S = 60  # a request unanswered this long counts as hung


@pytest.fixture(scope="module")
def doomed_server(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path):
    yield from _server(tmp_path_factory.mktemp("faults"), tiny_model, [])


def _scheduler(server, rank: int) -> psutil.Process:
    procs = psutil.Process(server.server.proc.pid).children(recursive=True)
    (proc,) = [p for p in procs if f"scheduler_DP{rank}" in " ".join(p.cmdline())]
    return proc


def _outcome(server, i: int) -> str:
    try:
        resp = server.generate(ids(random.Random(i), 300), rid=f"load-{i}", max_new_tokens=48, timeout=HUNG_S)
    except requests.Timeout:
        return "hung"
    return "answered" if resp.status_code == 200 else f"error {resp.status_code}"


def test_a_killed_rank_is_detected_and_no_request_hangs(doomed_server):
    assert requests.get(f"{doomed_server.url}/health", timeout=30).status_code == 200
    victim = _scheduler(doomed_server, 1)
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(_outcome, doomed_server, i) for i in range(32)]
        # kill once rank 1 holds some of them (the controller's decision log says where they went)
        deadline = time.monotonic() + 60
        while sum(d["rank"] == 1 for d in doomed_server.decisions().values()) < 4:
            assert time.monotonic() < deadline, "rank 1 never received requests"
        victim.send_signal(signal.SIGKILL)
        outcomes = [f.result() for f in futures]
    counts = {k: outcomes.count(k) for k in set(outcomes)}
    assert counts.get("hung", 0) == 0, counts
    assert counts.get("answered", 0) > 0, counts
    assert set(counts) <= {"answered", "error 503"}, counts  # the lost ones are told so, clearly
    # the surviving rank serves everything that comes next
    after = [
        doomed_server.generate(ids(random.Random(100 + i), 80), rid=f"after-{i}", max_new_tokens=4) for i in range(6)
    ]
    assert all(r.status_code == 200 for r in after), [r.text for r in after if r.status_code != 200]
    assert {r.json()["meta_info"]["dp_rank"] for r in after} == {0}
    assert doomed_server.metric("kvmul_rank_up") == {"0": 1.0, "1": 0.0}
    for path in ("/health", "/health_generate"):  # probes see the lost capacity, and which rank
        health = requests.get(f"{doomed_server.url}{path}", timeout=30)
        assert health.status_code == 503, (path, health.text)
        assert health.json()["down_ranks"] == [1] and health.json()["live_ranks"] == [0], health.text
        reason = health.json()["reasons"]["1"]
        # either watcher may see the death first: the scheduler process's exit, or its request
        # socket closing (the dispatcher's monitor); the reason names which
        assert reason.startswith("scheduler pid") or reason == "its scheduler closed its request socket", reason
    assert f"kvmul: DP rank 1 is down ({reason}" in doomed_server.server.log_path.read_text()


def _health_file(proc: psutil.Process) -> str | None:
    """Where the controller writes rank health, from a child's environment (the launcher sets it)."""
    try:
        return proc.environ().get("SGLANG_KVMUL_HEALTH_FILE")
    except psutil.Error:  # the killed rank: gone, or a zombie
        return None


def test_sigterm_stops_every_process_and_removes_the_launchers_state_dir(doomed_server):
    """Last in this module: the operator stops the (degraded) server as a service manager would,
    SIGTERM to the launcher. Every process it started exits, and the private directory holding the
    controller's rank-health file (0700, made by the launcher) is removed: a SIGKILL-only stop left
    one behind in /tmp for every server started."""
    proc = doomed_server.server.proc
    kids = psutil.Process(proc.pid).children(recursive=True)
    (state,) = {Path(f).parent for k in kids if (f := _health_file(k))}
    assert state.name.startswith("sglang-kvmul-") and state.stat().st_mode & 0o777 == 0o700
    proc.terminate()
    proc.wait(timeout=60)
    _, alive = psutil.wait_procs(kids, timeout=30)
    assert not alive, [p.pid for p in alive]
    assert not state.exists()
