"""Shared fixtures: the tiny model and real SGLang servers on CPU (dp=2) under our launcher."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from sglang_kvmul.harness.local_server import LocalServer, cpu_server_args, running_server
from sglang_kvmul.harness.tiny_model import build
from sglang_kvmul.launch.ports import free_port_range
from sglang_kvmul.serving.settings import KvmulSettings

MAX_TOTAL_TOKENS = 16384  # per rank; tests that need eviction use their own server


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return build("tiny")


class Server:
    """A running server plus what the tests read from it."""

    def __init__(self, server: LocalServer, decision_log: Path, metrics_port: int) -> None:
        self.server = server
        self.url = server.url
        self.decision_log = decision_log
        self.metrics_port = metrics_port
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"

    def generate(
        self, input_ids: list[int], rid: str, max_new_tokens: int = 8, timeout: float = 120, **extra: object
    ) -> requests.Response:
        body = {
            "input_ids": input_ids,
            "rid": rid,
            "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True},
            **extra,
        }
        return requests.post(self.url + "/generate", json=body, timeout=timeout)

    def metric(self, name: str, label: str = "rank") -> dict[str, float]:
        """A labelled metric of the controller, by its one label's value (one scrape)."""
        out = {}
        for line in requests.get(self.metrics_url, timeout=10).text.splitlines():
            if line.startswith(name + "{"):
                labels, value = line.rsplit(" ", 1)
                out[labels.split(f'{label}="')[1].split('"')[0]] = float(value)
        return out

    def wait_quiet(self, timeout: float = 30) -> None:
        """Until the controller's ledger shows every rank idle (no batch, no queued prefill): a
        sequential client can otherwise outrun the load snapshot that shows its last request done,
        and the product rule then weighs a finished request. No-op without the metrics endpoint."""
        if not self.metrics_port:
            return
        deadline = time.monotonic() + timeout
        while any(self.metric("kvmul_batch_size").values()) or any(
            self.metric("kvmul_queued_uncached_tokens").values()
        ):
            assert time.monotonic() < deadline, "the controller never saw the ranks idle"
            time.sleep(0.02)  # polling interval

    def metric_total(self, name: str) -> float:
        """A metric without labels (one scrape)."""
        for line in requests.get(self.metrics_url, timeout=10).text.splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def decision_lines(self) -> list[dict]:
        """Every decision the controller logged, in order (a request sent twice would appear twice)."""
        if not self.decision_log.exists():
            return []
        return [json.loads(line) for line in self.decision_log.read_text().splitlines()]

    def decisions(self) -> dict[str, dict]:
        if not self.decision_log.exists():
            return {}
        lines = self.decision_log.read_text().splitlines()
        return {d["rid"]: d for d in map(json.loads, lines)}


def _server(
    tmp_dir: Path, model: Path, extra: list[str], shape: tuple[str, ...] = ("--dp-size", "2")
) -> Iterator[Server]:
    """A server of `shape` (plain DP by default) with kvmul's decision log and metrics on."""
    log = tmp_dir / "decisions.jsonl"
    metrics_port = free_port_range(1)
    args = [*shape, *cpu_server_args(MAX_TOTAL_TOKENS), "--kvmul-metrics-port", str(metrics_port), *extra]
    env = KvmulSettings(decision_log=str(log)).to_env()
    with running_server(model, args, tmp_dir / "server.log", env=env) as srv:
        yield Server(srv, log, metrics_port)


@pytest.fixture(scope="session")
def kvmul_server(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Server]:
    yield from _server(tmp_path_factory.mktemp("kvmul"), tiny_model, [])


@pytest.fixture(scope="module")
def round_robin_server(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Server]:
    # module scope: the stock controller busy-spins a core, so it must not outlive its tests
    yield from _server(tmp_path_factory.mktemp("rr"), tiny_model, ["--load-balance-method", "round_robin"])
