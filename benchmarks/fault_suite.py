"""Fault suite: what happens to every request when things go wrong, on the real CPU server (dp=2,
tiny model). Each scenario counts requests in / answered / errored / duplicated / hung:
  * load: 300 concurrent shared-prefix requests (32 at a time), three rounds;
  * dropped streams: 50 streamed requests whose clients hang up mid-way, then a normal one;
  * bad inputs: each body that kills stock SGLang 0.5.23, sent to a stock round_robin server (is it
    still alive?) and to kvmul (400 and still serving?);
  * event-stream faults: junk sent to both ranks' KV-event ports during load;
  * killed rank: SIGKILL of scheduler_DP1 under load.
answered = HTTP 200; errored = any other status; hung = no answer within 60 s; duplicated = a
request the controller both forwarded and rejected, or forwarded twice (from its decision log).
Not a timed test: run `python -m benchmarks.fault_suite` (~4 min).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import signal
import socket
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import requests
from tqdm import tqdm

from benchmarks.common import RESULTS, write_results
from sglang_kvmul.harness.local_server import LocalServer, cpu_server_args, start_server
from sglang_kvmul.harness.tiny_model import VOCAB, build
from sglang_kvmul.launch.ports import free_port_range
from sglang_kvmul.serving.settings import KvmulSettings

HUNG_S = 60
BAD_INPUTS = {
    "token id past the vocabulary": {"input_ids": [1, 2, 10**9]},
    "negative token id, pinned": {"input_ids": [-5, 1, 2], "routed_dp_rank": 1},
    "batch with an empty item": {"input_ids": [[1, 2, 3], [], [1, 10**9]]},
    "logprob_start_len -100": {"input_ids": [1, 2, 3], "return_logprob": True, "logprob_start_len": -100},
}


class Kvmul:
    """A kvmul server with its decision log and metrics."""

    def __init__(self, model: Path, work: Path, tag: str) -> None:
        self.log = work / f"{tag}.decisions.jsonl"
        self.log.unlink(missing_ok=True)
        self.metrics_port = free_port_range(1)
        env = KvmulSettings(decision_log=str(self.log)).to_env()
        args = ["--dp-size", "2", *cpu_server_args(16384), "--kvmul-metrics-port", str(self.metrics_port)]
        self.srv = start_server(model, args, work / f"{tag}.server.log", env=env)

    def forwarded(self) -> Counter[str]:
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return Counter(json.loads(line)["rid"] for line in lines)

    def on_rank(self, rank: int) -> int:
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return sum(json.loads(line)["rank"] == rank for line in lines)

    def stop(self) -> None:
        self.srv.stop()


def _post(url: str, body: dict, timeout: float = HUNG_S) -> str:
    try:
        resp = requests.post(url + "/generate", json=body, timeout=timeout)
    except requests.Timeout:
        return "hung"
    except requests.ConnectionError:
        return "connection refused"
    return "answered" if resp.status_code == 200 else f"error {resp.status_code}"


def _body(rid: str, tokens: list[int], out: int = 8, **extra: object) -> dict:
    return {"rid": rid, "input_ids": tokens, "sampling_params": {"max_new_tokens": out, "ignore_eos": True}, **extra}


def _load(url: str, tag: str, n: int, rng: random.Random, out: int = 8) -> tuple[list[str], list[str]]:
    prefixes = [[rng.randrange(3, VOCAB) for _ in range(400)] for _ in range(12)]
    bodies = [
        _body(f"{tag}-{i}", prefixes[i % 12] + [rng.randrange(3, VOCAB) for _ in range(16)], out) for i in range(n)
    ]
    with ThreadPoolExecutor(32) as pool:
        outcomes = list(pool.map(lambda b: _post(url, b), bodies))
    return [b["rid"] for b in bodies], outcomes


def _row(scenario: str, rids: list[str], outcomes: list[str], forwarded: Counter[str], rejected: set[str]) -> dict:
    c = Counter(outcomes)
    dup = sum(1 for r in rids if forwarded[r] > 1 or (forwarded[r] >= 1 and r in rejected))
    errored = sum(v for k, v in c.items() if k.startswith("error") or k == "connection refused")
    return {"scenario": scenario, "in": len(rids), "answered": c["answered"], "errored": errored,
            "duplicated": dup, "hung": c["hung"], "outcomes": dict(c)}  # fmt: skip


def _alive(srv: LocalServer) -> bool:
    if srv.proc.poll() is not None:
        return False
    return _post(srv.url, _body("probe", [5, 6, 7], 2), timeout=30) == "answered"


def scenario_load(k: Kvmul, rng: random.Random) -> list[dict]:
    rows = []
    for rnd in range(3):
        rids, outcomes = _load(k.srv.url, f"load{rnd}", 300, rng)
        rows.append(_row(f"load, round {rnd + 1} (300 x 32 concurrent)", rids, outcomes, k.forwarded(), set()))
    return rows


def scenario_dropped_streams(k: Kvmul, rng: random.Random) -> dict:
    rids = [f"drop-{i}" for i in range(50)]

    def drop(rid: str) -> str:
        body = _body(rid, [rng.randrange(3, VOCAB) for _ in range(200)], 64, stream=True)
        with requests.post(k.srv.url + "/generate", json=body, stream=True, timeout=HUNG_S) as resp:
            next(resp.iter_lines())  # the first chunk, then the client hangs up
        return "answered" if resp.status_code == 200 else f"error {resp.status_code}"

    with ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(drop, rids))
    outcomes.append(_post(k.srv.url, _body("after-drop", [5] * 50)))
    return _row("50 streams dropped mid-way, then one request", [*rids, "after-drop"], outcomes, k.forwarded(), set())


def scenario_bad_inputs(k: Kvmul, model: Path, work: Path) -> list[dict]:
    rows = []
    for name, body in tqdm(BAD_INPUTS.items(), desc="bad inputs (stock server per input)"):
        stock = start_server(model, ["--dp-size", "2", "--load-balance-method", "round_robin",
                                     *cpu_server_args(16384)], work / "stock.server.log")  # fmt: skip
        try:
            stock_outcome = _post(stock.url, {**body, "sampling_params": {"max_new_tokens": 2}}, timeout=30)
            stock_alive = _alive(stock)
        finally:
            stock.stop()
        rid = f"bad-{len(rows)}"
        outcome = _post(k.srv.url, {**body, "rid": rid, "sampling_params": {"max_new_tokens": 2}})
        row = _row(f"bad input: {name}", [rid], [outcome], k.forwarded(), {rid} if outcome == "error 400" else set())
        rows.append({**row, "stock": f"{stock_outcome}, server {'alive' if stock_alive else 'DEAD'}",
                     "kvmul": f"{outcome}, server {'alive' if _alive(k.srv) else 'DEAD'}"})  # fmt: skip
    return rows


def scenario_event_faults(k: Kvmul, rng: random.Random) -> dict:
    """Garbage bytes from raw TCP connections to every rank's KV-event and replay ports while
    requests flow (what a stranger on the host can do to the event plane)."""
    cfg = json.loads(requests.get(k.srv.url + "/server_info", timeout=10).json()["kv_events_config"])
    bases = [int(cfg[key].rsplit(":", 1)[1]) for key in ("endpoint", "replay_endpoint")]

    def junk() -> None:
        for _ in range(50):
            for port in (b + r for b in bases for r in range(2)):
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                    s.sendall(rng.randbytes(512))

    with ThreadPoolExecutor(1) as side:
        fut = side.submit(junk)
        rids, outcomes = _load(k.srv.url, "evfault", 100, rng)
        fut.result()
    return _row("junk on every KV-event and replay port during 100 requests", rids, outcomes, k.forwarded(), set())


def scenario_killed_rank(model: Path, work: Path, rng: random.Random) -> dict:
    k = Kvmul(model, work, "kill")
    try:
        procs = psutil.Process(k.srv.proc.pid).children(recursive=True)
        (victim,) = [p for p in procs if "scheduler_DP1" in " ".join(p.cmdline())]
        with ThreadPoolExecutor(1) as side:
            fut = side.submit(_load, k.srv.url, "kill", 64, rng, 48)
            deadline = time.monotonic() + 60
            while k.on_rank(1) < 8 and time.monotonic() < deadline:
                time.sleep(0.05)  # polling the decision log until rank 1 holds requests
            victim.send_signal(signal.SIGKILL)
            rids, outcomes = fut.result()
        after_rids, after = _load(k.srv.url, "after-kill", 16, rng)
        row = _row("SIGKILL scheduler_DP1 under 64 requests, then 16 more", [*rids, *after_rids], [*outcomes, *after],
                   k.forwarded(), set())  # fmt: skip
        metrics = requests.get(f"http://127.0.0.1:{k.metrics_port}/metrics", timeout=10).text
        row["rank_up"] = [line for line in metrics.splitlines() if line.startswith("kvmul_rank_up{")]
        return row
    finally:
        k.stop()


def table(rows: list[dict]) -> str:
    out = ["| scenario | in | answered | errored | duplicated | hung | detail |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        detail = f"stock: {r['stock']}; kvmul: {r['kvmul']}" if "stock" in r else ", ".join(
            f"{k}: {v}" for k, v in sorted(r["outcomes"].items()))  # fmt: skip
        out.append(f"| {r['scenario']} | {r['in']} | {r['answered']} | {r['errored']} | {r['duplicated']} | "
                   f"{r['hung']} | {detail} |")  # fmt: skip
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="fault_suite")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    model, rng = build("tiny"), random.Random(args.seed)
    work = RESULTS / f"{args.name}.work"
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    k = Kvmul(model, work, "kvmul")
    try:
        steps = [
            ("load", lambda: scenario_load(k, rng)),
            ("dropped streams", lambda: [scenario_dropped_streams(k, rng)]),
            ("event faults", lambda: [scenario_event_faults(k, rng)]),
            ("bad inputs", lambda: scenario_bad_inputs(k, model, work)),
        ]
        for name, step in tqdm(steps, desc="scenarios"):
            rows += step()
            tqdm.write(f"{name}: done")
    finally:
        k.stop()
    rows.append(scenario_killed_rank(model, work, rng))
    write_results(args.name, __doc__, {"config": vars(args), "rows": rows}, table(rows))


if __name__ == "__main__":
    main()
