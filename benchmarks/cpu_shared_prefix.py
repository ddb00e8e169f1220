"""kvmul vs SGLang's round_robin on a real CPU SGLang server (dp=2), shared-prefix workload.

The regime where routing matters: each rank's KV pool holds only ~half of the workload's distinct
prefixes (16 groups x 1024-token prefixes, 8 requests each with a 32-token suffix, 8 output
tokens, Poisson 1 req/s, shuffled group order; pool = 16*1024/2*1.2 tokens per rank). Methods run
interleaved (alternating order), each on a fresh server warmed up and flushed, `--reps` times.
Writes JSON, a markdown table and a PNG to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import requests
from tqdm import tqdm

from benchmarks.common import RESULTS, pyplot, write_results
from benchmarks.loadgen import Request, replay, shared_prefix_workload
from sglang_kvmul.harness.local_server import cpu_server_args, running_server
from sglang_kvmul.harness.tiny_model import VOCAB, build
from sglang_kvmul.serving.settings import KvmulSettings

METHODS = ("kvmul", "round_robin")


def warm_up(url: str, prompt_len: int) -> None:
    """Run each rank once on unrelated prompts (first-call costs), then empty both caches."""
    rng = random.Random(12345)
    for rank in (0, 1, 0, 1):
        body = {
            "input_ids": [rng.randrange(3, VOCAB) for _ in range(prompt_len)],
            "routed_dp_rank": rank,
            "sampling_params": {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True},
        }
        requests.post(url + "/generate", json=body, timeout=300).raise_for_status()
    requests.post(url + "/flush_cache", timeout=60).raise_for_status()
    loads = requests.get(url + "/v1/loads", timeout=10).json()["loads"]
    assert all(ld["num_used_tokens"] == 0 for ld in loads), loads


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def summarize(rows: list[dict], skip: int) -> dict:
    ok = [r for r in rows if r["error"] is None]
    warm = [r for r in ok if r["idx"] >= skip]
    out = {"requests": len(rows), "errors": len(rows) - len(ok)}
    for name, sel in (("all", ok), ("warm", warm)):
        t = [r["ttft"] * 1000 for r in sel]
        out[name] = {
            "n": len(t),
            "ttft_mean_ms": statistics.mean(t),
            "ttft_median_ms": statistics.median(t),
            "ttft_p99_ms": pct(t, 0.99),
            "cached_fraction": sum(r["cached_tokens"] for r in sel) / sum(r["prompt_tokens"] for r in sel),
        }
    out["per_rank_requests"] = {str(k): sum(1 for r in ok if r["dp_rank"] == k) for k in (0, 1)}
    return out


def prediction_match(rows: list[dict], decisions: list[dict], rid_prefix: str) -> dict:
    by_rid = {d["rid"]: d for d in decisions}
    n = same = 0
    for r in rows:
        d = by_rid.get(f"{rid_prefix}{r['idx']}")
        if d is None or r["error"]:
            continue
        n += 1
        same += d["predicted_cached"] == r["cached_tokens"] and d["rank"] == r["dp_rank"]
    return {"n": n, "exact": same, "share": same / n if n else None}


def run_one(model: Path, method: str, reqs: list[Request], args: argparse.Namespace, tag: str, work: Path) -> dict:
    log = work / f"{tag}.decisions.jsonl"
    log.unlink(missing_ok=True)
    srv_args = ["--dp-size", "2", "--load-balance-method", method, *cpu_server_args(args.pool)]
    # Both methods get the same blocking controller loop (stock 0.5.23 spins a core, which on a
    # 2-core machine would slow round_robin's schedulers and not kvmul's): only routing differs.
    env = KvmulSettings(decision_log=str(log), poll_all_methods=True).to_env()
    with running_server(model, srv_args, work / f"{tag}.server.log", env=env) as server:
        warm_up(server.url, args.prefix + args.suffix)
        t0 = time.time()
        results = replay(server.url, reqs, desc=tag, rid_prefix=f"{tag}-")
        wall = time.time() - t0
    rows = [r.to_dict() for r in results]
    run = {"tag": tag, "method": method, "wall_s": wall, "summary": summarize(rows, args.skip), "rows": rows}
    if method == "kvmul":
        decisions = [json.loads(x) for x in log.read_text().splitlines()]
        run["prediction"] = prediction_match(rows, decisions, f"{tag}-")
    return run


def table(report: dict) -> str:
    lines = [
        "| run | method | mean TTFT ms | median | P99 | warm mean | warm median | cached frac | rank0/rank1 | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        s = run["summary"]
        a, w = s["all"], s["warm"]
        split = f"{s['per_rank_requests']['0']}/{s['per_rank_requests']['1']}"
        lines.append(
            f"| {run['tag']} | {run['method']} | {a['ttft_mean_ms']:.0f} | {a['ttft_median_ms']:.0f} | "
            f"{a['ttft_p99_ms']:.0f} | {w['ttft_mean_ms']:.0f} | {w['ttft_median_ms']:.0f} | "
            f"{a['cached_fraction']:.3f} | {split} | {s['errors']} |"
        )
    lines += ["", "Pooled over repetitions:", ""]
    lines += ["| method | n | mean TTFT ms | median | P99 | cached frac |", "|---|---|---|---|---|---|"]
    for m, p in report["pooled"].items():
        a = p["all"]
        lines.append(
            f"| {m} | {a['n']} | {a['ttft_mean_ms']:.0f} | {a['ttft_median_ms']:.0f} | {a['ttft_p99_ms']:.0f} | "
            f"{a['cached_fraction']:.3f} |"
        )
    r = report["ratios_kvmul_over_round_robin"]
    lines += [
        "",
        f"kvmul / round_robin, pooled: mean {r['all']['mean']:.2f}, median {r['all']['median']:.2f}, "
        f"P99 {r['all']['p99']:.2f}; without the first {report['config']['skip']} arrivals: mean "
        f"{r['warm']['mean']:.2f}, median {r['warm']['median']:.2f}",
    ]
    lines += ["", "Targets (issue: median <= 0.5x, mean <= 0.7x round_robin, >= 0.8 of prompt tokens cached):", ""]
    lines += ["| phase | median ratio | mean ratio | kvmul cached frac | all met |", "|---|---|---|---|---|"]
    for phase in ("all", "warm"):
        med, mean = r[phase]["median"], r[phase]["mean"]
        frac = report["pooled"]["kvmul"][phase]["cached_fraction"]
        ok = med <= 0.5 and mean <= 0.7 and frac >= 0.8
        lines.append(f"| {phase} | {med:.2f} | {mean:.2f} | {frac:.3f} | {'yes' if ok else 'no'} |")
    cfg = report["config"]
    ideal = (cfg["per_group"] - 1) / cfg["per_group"] * cfg["prefix"] / (cfg["prefix"] + cfg["suffix"])
    lines.append(
        f"\n(Over all requests even ideal affinity caches at most {ideal:.3f}: each group's first request is a "
        f"compulsory miss. 'warm' leaves out the first {cfg['skip']} arrivals.)"
    )
    if report.get("prediction"):
        p = report["prediction"]
        lines.append(
            f"kvmul predicted cached tokens (and rank) equal to SGLang's report: {p['exact']}/{p['n']} "
            f"requests ({p['share']:.3f}), concurrent traffic"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    plt = pyplot()

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for m in METHODS:
        t = sorted(r["ttft"] * 1000 for run in report["runs"] if run["method"] == m for r in run["rows"] if r["ttft"])
        ax1.plot(t, [(i + 1) / len(t) for i in range(len(t))], label=m)
    ax1.set_xscale("log")
    ax1.set_xlabel("TTFT (ms)")
    ax1.set_ylabel("CDF")
    ax1.set_title("TTFT, all repetitions pooled")
    ax1.legend()
    tags = [run["tag"] for run in report["runs"]]
    means = [run["summary"]["all"]["ttft_mean_ms"] for run in report["runs"]]
    colors = ["C0" if run["method"] == METHODS[0] else "C1" for run in report["runs"]]
    ax2.bar(tags, means, color=colors)
    ax2.set_ylabel("mean TTFT (ms)")
    ax2.set_title("per run (interleaved order)")
    ax2.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_outputs(report: dict, name: str, write_json: bool = True) -> None:
    write_results(name, __doc__, report, table(report), write_json=write_json)
    plot(report, RESULTS / f"{name}.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--groups", type=int, default=16)
    ap.add_argument("--per-group", type=int, default=8)
    ap.add_argument("--prefix", type=int, default=1024)
    ap.add_argument("--suffix", type=int, default=32)
    ap.add_argument("--out-len", type=int, default=8)
    ap.add_argument("--rate", type=float, default=1.0)
    ap.add_argument("--pool", type=int, default=None, help="KV tokens per rank (default: groups*prefix/2*1.2)")
    ap.add_argument("--skip", type=int, default=None, help="arrivals excluded from the warm figures (default 2*groups)")
    ap.add_argument("--model", default="bench", help="built-in model shape (tiny_model.SHAPES)")
    ap.add_argument("--name", default="cpu_shared_prefix")
    ap.add_argument("--render", action="store_true", help="only rewrite the markdown/PNG from the saved JSON")
    args = ap.parse_args()
    if args.render:
        write_outputs(json.loads((RESULTS / f"{args.name}.json").read_text()), args.name, write_json=False)
        return
    args.pool = args.pool or int(args.groups * args.prefix / 2 * 1.2)
    args.skip = 2 * args.groups if args.skip is None else args.skip

    model = build(args.model)
    reqs = shared_prefix_workload(
        args.groups, args.per_group, args.prefix, args.suffix, args.out_len, args.rate, seed=1, vocab=VOCAB
    )
    work = RESULTS / f"{args.name}.work"
    work.mkdir(parents=True, exist_ok=True)
    order = [(rep, m) for rep in range(args.reps) for m in (METHODS if rep % 2 == 0 else METHODS[::-1])]
    runs = []
    for rep, method in tqdm(order, desc="runs", unit="run"):
        runs.append(run_one(model, method, reqs, args, f"r{rep}-{method}", work))
        s = runs[-1]["summary"]["all"]
        tqdm.write(
            f"{runs[-1]['tag']}: mean {s['ttft_mean_ms']:.0f} ms, median {s['ttft_median_ms']:.0f} ms, "
            f"cached {s['cached_fraction']:.3f}"
        )

    pooled = {m: summarize([r for run in runs if run["method"] == m for r in run["rows"]], args.skip) for m in METHODS}
    ratios = {
        k: {
            "mean": pooled["kvmul"][k]["ttft_mean_ms"] / pooled["round_robin"][k]["ttft_mean_ms"],
            "median": pooled["kvmul"][k]["ttft_median_ms"] / pooled["round_robin"][k]["ttft_median_ms"],
            "p99": pooled["kvmul"][k]["ttft_p99_ms"] / pooled["round_robin"][k]["ttft_p99_ms"],
        }
        for k in ("all", "warm")
    }
    preds = [run["prediction"] for run in runs if "prediction" in run]
    prediction = {"n": sum(p["n"] for p in preds), "exact": sum(p["exact"] for p in preds)}
    prediction["share"] = prediction["exact"] / max(1, prediction["n"])
    report = {
        "config": {k: v for k, v in vars(args).items()},
        "runs": runs,
        "pooled": pooled,
        "ratios_kvmul_over_round_robin": ratios,
        "prediction": prediction,
    }
    write_outputs(report, args.name)


if __name__ == "__main__":
    main()
