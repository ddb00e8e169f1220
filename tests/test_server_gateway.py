"""Two kvmul servers (dp=2 each) behind the real SGLang gateway (`sglang-router`, cache_aware), started
with `launch/gateway.sh`: shared-prefix traffic is answered once per request, and each server's
kvmul keeps each prefix on one of its ranks."""

from __future__ import annotations

import os
import random
import sys
import time
from collections import Counter, defaultdict
from contextlib import ExitStack
from pathlib import Path

import pytest
import requests
from conftest import _server
from routing_checks import ids

from sglang_kvmul.harness.local_server import start_server

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path):
    with ExitStack() as stack:
        servers = []
        for i in range(2):
            gen = _server(tmp_path_factory.mktemp(f"gw-server{i}"), tiny_model, [])
            servers.append(next(gen))
            stack.callback(lambda g=gen: next(g, None))  # finishes the generator: stops that server
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
        env = {"PATH": path, "WORKER_URLS": " ".join(s.url for s in servers)}
        cmd = ["bash", "-c", f'exec bash {ROOT / "launch" / "gateway.sh"} --port "$PORT" --log-level warn']
        gw = start_server(tiny_model, [], tmp_path_factory.mktemp("gw") / "gateway.log", command=cmd, env=env)
        stack.callback(gw.stop)
        deadline = time.monotonic() + 90  # the gateway health-checks its workers on its own schedule
        while requests.get(gw.url + "/readiness", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "the gateway never saw its workers healthy"
            time.sleep(0.25)  # polling interval
        yield gw, servers


def test_the_gateway_picks_the_server_and_kvmul_the_rank(gateway):
    gw, servers = gateway
    rng = random.Random(21)
    prefixes = [ids(rng, 300) for _ in range(6)]
    sent, where = [], defaultdict(set)
    for rep in range(4):
        for g, prefix in enumerate(prefixes):
            rid = f"gw-{g}-{rep}"
            body = {"rid": rid, "input_ids": prefix + ids(rng, 12), "sampling_params": {"max_new_tokens": 4}}
            resp = requests.post(gw.url + "/generate", json=body, timeout=120)
            assert resp.status_code == 200, resp.text
            sent.append(rid)
            if rep > 0:
                assert resp.json()["meta_info"]["cached_tokens"] >= 300, (g, rep, resp.json()["meta_info"])
    forwarded: Counter[str] = Counter()
    for s, server in enumerate(servers):
        for d in server.decision_lines():
            if d["rid"].startswith("gw-"):
                forwarded[d["rid"]] += 1
                where[(s, d["rid"].split("-")[1])].add(d["rank"])
    assert sorted(forwarded) == sorted(sent) and set(forwarded.values()) == {1}  # each once, on one server
    assert all(len(ranks) == 1 for ranks in where.values()), dict(where)  # each server: a prefix on one rank
    assert len({s for s, _ in where}) == 2 or len({r for ranks in where.values() for r in ranks}) == 2
