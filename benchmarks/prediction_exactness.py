"""How often kvmul's predicted cached tokens equal what SGLang reports, on the real CPU server.

Shared-prefix groups under KV-cache pressure (each rank's pool holds about half the prefixes, so
LRU evictions happen), sent once sequentially (one request at a time) and once concurrently
(Poisson arrivals). Every mismatch gets a reason:
  in-flight      the prediction used the credit of a dispatched prompt whose blocks were not
                 (or no longer) in the cache when this request was scheduled
  cache-shrank   the mirror had the blocks at routing time; the scheduler no longer did (evicted
                 between routing and scheduling)
  events-lagged  the scheduler had more cached than the mirror knew (events still in flight)
  rank           SGLang served the request on another rank than the controller chose (never expected)
Writes JSON and a markdown table to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter

import requests

from benchmarks.common import RESULTS, write_results
from benchmarks.loadgen import Request, replay, shared_prefix_workload
from sglang_kvmul.harness.local_server import cpu_server_args, running_server
from sglang_kvmul.harness.tiny_model import VOCAB, build
from sglang_kvmul.serving.settings import KvmulSettings


def reason(d: dict, reported_cached: int, reported_rank: int | None) -> str | None:
    if reported_rank is not None and reported_rank != d["rank"]:
        return "rank"
    predicted = d["predicted_cached"]
    if predicted == reported_cached:
        return None
    if d["from_pending"][d["rank"]]:
        return "in-flight"
    return "cache-shrank" if predicted > reported_cached else "events-lagged"


def sequential(url: str, reqs: list[Request], tag: str) -> list[dict]:
    rows = []
    for r in reqs:
        body = {
            "rid": f"{tag}-{r.idx}",
            "input_ids": r.input_ids,
            "sampling_params": {"max_new_tokens": r.max_new_tokens, "temperature": 0, "ignore_eos": True},
        }
        meta = requests.post(url + "/generate", json=body, timeout=300).json()["meta_info"]
        rows.append({"idx": r.idx, "cached_tokens": meta["cached_tokens"], "dp_rank": meta["dp_rank"]})
    return rows


def score(rows: list[dict], decisions: dict[str, dict], tag: str) -> dict:
    reasons: Counter[str] = Counter()
    exact = 0
    for row in rows:
        d = decisions[f"{tag}-{row['idx']}"]
        why = reason(d, row["cached_tokens"], row["dp_rank"])
        if why is None:
            exact += 1
        else:
            reasons[why] += 1
    return {"requests": len(rows), "exact": exact, "share": exact / len(rows), "mismatch_reasons": dict(reasons)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--groups", type=int, default=12)
    ap.add_argument("--per-group", type=int, default=10)
    ap.add_argument("--prefix", type=int, default=512)
    ap.add_argument("--suffix", type=int, default=32)
    ap.add_argument("--rate", type=float, default=6.0, help="concurrent phase, requests per second")
    ap.add_argument("--page-size", type=int, default=1)
    ap.add_argument("--name", default="prediction_exactness")
    args = ap.parse_args()
    pool = int(args.groups * args.prefix / 2 * 1.2)
    reqs = shared_prefix_workload(args.groups, args.per_group, args.prefix, args.suffix, 4, args.rate, 7, VOCAB)
    work = RESULTS / f"{args.name}.work"
    work.mkdir(parents=True, exist_ok=True)
    log = work / "decisions.jsonl"
    log.unlink(missing_ok=True)
    srv_args = ["--dp-size", "2", "--page-size", str(args.page_size), *cpu_server_args(pool)]
    with running_server(
        build("tiny"), srv_args, work / "server.log", env=KvmulSettings(decision_log=str(log)).to_env()
    ) as s:
        t0 = time.time()
        seq_rows = sequential(s.url, reqs, "seq")
        requests.post(s.url + "/flush_cache", timeout=60).raise_for_status()
        conc = [r.to_dict() for r in replay(s.url, reqs, desc="concurrent", rid_prefix="conc-")]
        wall = time.time() - t0
    decisions = {d["rid"]: d for d in map(json.loads, log.read_text().splitlines())}
    report = {
        "config": {**vars(args), "pool_tokens_per_rank": pool, "wall_s": wall},
        "sequential": score(seq_rows, decisions, "seq"),
        "concurrent": score([r for r in conc if r["error"] is None], decisions, "conc"),
    }
    lines = [
        "| traffic | requests | predicted == reported | share | mismatch reasons |",
        "|---|---|---|---|---|",
    ]
    for k in ("sequential", "concurrent"):
        r = report[k]
        lines.append(f"| {k} | {r['requests']} | {r['exact']} | {r['share']:.3f} | {r['mismatch_reasons'] or '-'} |")
    write_results(args.name, __doc__, report, "\n".join(lines))


if __name__ == "__main__":
    main()
