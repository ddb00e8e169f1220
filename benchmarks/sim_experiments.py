"""Cluster-scale policy comparison in the simulator (first experiment: N ranks, one workload, all rules).

Every rule is the production one (`sglang_kvmul.policies` through `KvmulRouter`, fed the simulated
ranks' KV events and load snapshots). Step times come from a cost profile (`sim/cost.py`; the GPU
profiles are UNMEASURED rooflines). Writes JSON, a markdown table and a PNG to
benchmarks/results/sim/.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from results_io import RESULTS
from tqdm import tqdm

from sglang_kvmul import workloads
from sglang_kvmul.sim.cost import PROFILES
from sglang_kvmul.sim.engine import SimConfig, Simulation
from sglang_kvmul.sim.rank import RankConfig

TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "mooncake" / "conversation_trace.jsonl"
RULES = "kvmul,cache_only,load_only,vllm_v1,dynamo,sglang_cache_aware,linear:0.25,linear:0.5,linear:0.75,linear:0.9"


def summarize(rule: str, reqs: list, ranks: int, wall: float) -> dict:
    ttft = np.array([r.first_token - r.arrival for r in reqs]) * 1e3
    tpot = np.array([(r.finish - r.first_token) / (r.output_len - 1) for r in reqs if r.output_len > 1]) * 1e3
    per_rank = np.bincount([r.rank for r in reqs], minlength=ranks)
    return {
        "rule": rule,
        "requests": len(reqs),
        "ttft_mean_ms": float(ttft.mean()),
        "ttft_p99_ms": float(np.percentile(ttft, 99)),
        "tpot_mean_ms": float(tpot.mean()),
        "tpot_p99_ms": float(np.percentile(tpot, 99)),
        "hit_ratio": sum(r.cached for r in reqs) / sum(len(r.tokens) for r in reqs),
        "imbalance": float(per_rank.max() / per_rank.mean()),
        "sim_wall_s": wall,
        "ttft_samples": ttft.tolist(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=16)
    ap.add_argument("--fraction", type=float, default=1.0, help="share of the trace's conversations")
    ap.add_argument("--time-compression", type=float, default=1.0)
    ap.add_argument("--profile", default="h100-qwen2.5-7b", choices=sorted(PROFILES))
    ap.add_argument("--kv-tokens", type=int, default=1_000_000, help="KV pool per rank")
    ap.add_argument("--rules", default=RULES)
    ap.add_argument("--name", default="mooncake_16")
    args = ap.parse_args()
    work = workloads.mooncake(TRACE, fraction=args.fraction, time_compression=args.time_compression)
    tqdm.write(f"workload: {workloads.summary(work)}")
    rank = RankConfig(page_size=16, kv_pages=args.kv_tokens // 16)
    rows = []
    for rule in tqdm(args.rules.split(","), desc="rules"):
        t0 = time.perf_counter()
        reqs = Simulation(SimConfig(ranks=args.ranks, rank=rank, rule=rule), PROFILES[args.profile]).run(work)
        rows.append(summarize(rule, reqs, args.ranks, time.perf_counter() - t0))
        r = rows[-1]
        tqdm.write(f"{rule}: TTFT {r['ttft_mean_ms']:.0f} ms, hit {r['hit_ratio']:.3f}, sim {r['sim_wall_s']:.0f} s")
    out = RESULTS / "sim"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(
        json.dumps({"config": vars(args), "rows": [{k: v for k, v in r.items() if k != "ttft_samples"} for r in rows]})
    )
    lines = [
        f"# {args.name}\n\n{__doc__.strip()}\n\nConfig: `{json.dumps(vars(args))}`\n",
        "| rule | TTFT mean ms | TTFT P99 | TPOT mean ms | TPOT P99 | hit ratio | max/mean requests per rank | sim s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r["ttft_mean_ms"]):
        lines.append(
            f"| {r['rule']} | {r['ttft_mean_ms']:.0f} | {r['ttft_p99_ms']:.0f} | {r['tpot_mean_ms']:.1f} | "
            f"{r['tpot_p99_ms']:.1f} | {r['hit_ratio']:.3f} | {r['imbalance']:.2f} | {r['sim_wall_s']:.0f} |"
        )
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        xs = np.sort(r["ttft_samples"])
        ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), lw=2.5 if r["rule"] == "kvmul" else 1.2, label=r["rule"])
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (ms)")
    ax.set_ylabel("CDF")
    ax.set_title(f"simulated: {args.ranks} ranks, {args.profile} (unmeasured), x{args.time_compression:g} load")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{args.name}.png", dpi=100)


if __name__ == "__main__":
    main()
