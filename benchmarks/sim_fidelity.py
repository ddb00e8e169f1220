"""Simulator fidelity: the kvmul / round_robin TTFT ratio, simulated vs measured on the CPU server.

Replays the policy comparison's three workloads (same generators and scale, `policy_comparison.py`)
in the simulator with the fitted `cpu-bench` profile, the same two ranks, page size 1 and KV pool
as the real runs, and compares the mean-TTFT ratio kvmul / round_robin with the measured one
(`benchmarks/results/<workload>/summary.json`, pooled repetitions; each repetition's own ratio is
listed too, to show the measurement's spread). A third rule, `cache_only`, shows the one effect the
simulator leaves out on purpose: on this 2-core machine two busy CPU ranks, the HTTP server, the
tokenizer and the client share two cores, so a rule that piles everything on one rank can win there,
while simulated ranks are independent, as GPUs are. Writes JSON and a markdown table to
benchmarks/results/sim/.
"""

from __future__ import annotations

import json

import numpy as np

from benchmarks.common import RESULTS, write_results
from benchmarks.policy_comparison import WORKLOADS, pool
from sglang_kvmul.sim.cost import PROFILES
from sglang_kvmul.sim.engine import SimConfig, Simulation
from sglang_kvmul.sim.rank import RankConfig

RULES = ("kvmul", "round_robin", "cache_only")


def main() -> None:
    rows = []
    for wl, make in WORKLOADS.items():
        doc = json.loads((RESULTS / wl / "summary.json").read_text())
        run = doc["config"]["run"]
        pooled = {r["config"]: r for r in pool(doc["reps"]) if r["config"] in RULES}
        measured = {c: r["ttft_ms"]["mean"] for c, r in pooled.items()}
        reps = pooled["kvmul"]["rep_mean_ttft_ms"], pooled["round_robin"]["rep_mean_ttft_ms"]
        per_rep = [k / rr for k, rr in zip(*reps, strict=True)]
        work = make(run["token_scale"])
        rank = RankConfig(page_size=1, kv_pages=run["pool"], chunk_tokens=4096, decode_reserve_tokens=64)
        simulated, ranks_used = {}, {}
        for rule in RULES:
            reqs = Simulation(SimConfig(ranks=2, rank=rank, rule=rule), PROFILES["cpu-bench"].cost).run(work)
            simulated[rule] = float(np.mean([r.first_token - r.arrival for r in reqs]) * 1e3)
            ranks_used[rule] = np.bincount([r.rank for r in reqs], minlength=2).tolist()
        m_ratio = measured["kvmul"] / measured["round_robin"]
        s_ratio = simulated["kvmul"] / simulated["round_robin"]
        rows.append({
            "workload": wl, "measured_ms": measured, "simulated_ms": simulated,
            "measured_ratio": m_ratio, "measured_ratio_per_rep": per_rep, "simulated_ratio": s_ratio,
            "gap": s_ratio / m_ratio - 1,
            "measured_requests_per_rank": {c: pooled[c]["requests_per_rank"] for c in RULES},
            "simulated_requests_per_rank": ranks_used,
        })  # fmt: skip
    lines = [
        "| workload | measured kvmul / rr (ms) | ratio | per repetition | simulated kvmul / rr (ms) | ratio | gap |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in rows:
        m, s = r["measured_ms"], r["simulated_ms"]
        reps = " / ".join(f"{x:.2f}" for x in r["measured_ratio_per_rep"])
        lines.append(
            f"| {r['workload']} | {m['kvmul']:.0f} / {m['round_robin']:.0f} | {r['measured_ratio']:.2f} | {reps} | "
            f"{s['kvmul']:.0f} / {s['round_robin']:.0f} | {r['simulated_ratio']:.2f} | {r['gap']:+.0%} |"
        )
    lines += [
        "", "The one-rank effect: `cache_only` against round_robin, measured and simulated.", "",
        "| workload | cache_only requests per rank, measured | simulated | cache_only / rr measured | simulated |",
        "|---|---|---|---|---|",
    ]  # fmt: skip
    for r in rows:
        m, s = r["measured_ms"], r["simulated_ms"]
        lines.append(
            f"| {r['workload']} | {r['measured_requests_per_rank']['cache_only']} | "
            f"{r['simulated_requests_per_rank']['cache_only']} | "
            f"{m['cache_only'] / m['round_robin']:.2f} | {s['cache_only'] / s['round_robin']:.2f} |"
        )
    config = {"rules": list(RULES), "profile": "cpu-bench", "measured": "results/<workload>/summary.json"}
    write_results("sim/fidelity", __doc__, {"config": config, "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
