"""Simulator fidelity: the simulated rule order against the one measured on the CPU server.

Replays the policy comparison's workloads (same generators and scale, `policy_comparison.py`) in the
simulator with the fitted `cpu-bench` profile, the same two ranks, page size 1 and KV pool as the
real runs (`benchmarks/results/<set>/summary.json`, pooled repetitions; each repetition's own figure
is listed too, to show the measurement's spread).

Simulated ranks are independent, as GPUs are. On the 2-core CPU server they are not: the two ranks,
the HTTP server, the tokenizer and the client share two cores, and a busy rank slows the other one
(`benchmarks/cpu_contention.py`), so a rule that spreads work over both ranks pays for it there and a
rule that piles everything on one rank does not. Each replay is therefore run three ways:
  * `as fitted`: `cpu-bench` as fitted (on the machine `fit_cpu_cost` last ran on), independent ranks;
  * `this machine`: `cpu-bench`'s prefill and decode times scaled to the machine the contention
    benchmark ran on (its figures for one rank alone against the fit's), independent ranks;
  * `shared cores`: the same, with the ranks slowing each other by the contention benchmark's four
    measured factors (`sim.cost.SharedCores`: processor sharing, re-timed at every step start and end).
Every factor is measured; what is assumed is the model: a step's rate depends only on which kind of
step the other rank runs, at the slowdown measured for one prompt size and one batch. Tables: the
kvmul / round_robin mean-TTFT ratio on each workload's default set; every configuration of the KV-pressure
set that ran on the same machine as the contention benchmark, with the rank correlation between the
measured and each simulated order. Writes JSON, a markdown table and a PNG to benchmarks/results/sim/.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from benchmarks.common import RESULTS, geo_mean, pyplot, write_results
from benchmarks.fit_cpu_cost import DECODE_CONTEXT  # cpu_contention decodes the same requests
from benchmarks.policy_comparison import GATEWAY, WORKLOADS, pool
from sglang_kvmul.sim.cost import PROFILES, CostModel, ScaledCost, SharedCores
from sglang_kvmul.sim.engine import SimConfig, Simulation
from sglang_kvmul.sim.rank import RankConfig
from sglang_kvmul.sim.workloads import TraceRequest

RULES = ("kvmul", "round_robin")
# the simulator's rule for each measured configuration that is not one of ours
SIM_RULE = {GATEWAY: "sglang_cache_aware", "total_requests": "load_only"}
MODES = ("as fitted", "this machine", "shared cores")
SIM_HEADS = " | ".join(f"simulated, {m}" for m in MODES) + " |"
CONTENTION = RESULTS / "cpu_contention.json"


def this_machine() -> tuple[CostModel, SharedCores, dict]:
    """`cpu-bench` as fast as the machine `cpu_contention` ran on, and its shared-cores factors."""
    doc = json.loads(CONTENTION.read_text())
    rows = {r["case"]: r for r in doc["rows"]}
    b, lens = doc["config"]["batch"], [int(x) for x in doc["config"]["prompt_lens"].split(",")]
    base = PROFILES["cpu-bench"].cost
    prefill = [rows[f"prefill {n} tokens"] for n in lens]
    decode = rows[f"decode batch {b}"]
    prefill_x = geo_mean([r["alone_s"] / base.prefill_s(n, 0, 1) for n, r in zip(lens, prefill, strict=True)])
    decode_x = decode["alone_s"] / base.decode_s(b, b * DECODE_CONTEXT)
    cores = SharedCores(
        prefill_with_prefill=geo_mean([r["ratio"] for r in prefill]),
        prefill_with_decode=rows[f"prefill {max(lens)} tokens, rank 1 decoding"]["ratio"],
        decode_with_decode=decode["ratio"],
        decode_with_prefill=rows[f"decode batch {b}, rank 1 prefilling"]["ratio"],
    )  # fmt: skip
    machine = {"prefill_x": prefill_x, "decode_x": decode_x, "shared_cores": vars(cores)}
    return ScaledCost(base, 1 / prefill_x, 1 / decode_x), cores, machine


def simulate(
    work: Sequence[TraceRequest], rank: RankConfig, rule: str, cost: CostModel, cores: SharedCores | None
) -> tuple[float, list[int]]:
    """Mean TTFT (ms) and requests per rank of one simulated run on two ranks."""
    reqs = Simulation(SimConfig(ranks=2, rank=rank, rule=rule, shared_cores=cores), cost).run(work)
    split = np.bincount([r.rank for r in reqs], minlength=2).tolist()
    return float(np.mean([r.first_token - r.arrival for r in reqs]) * 1e3), split


def replay(set_name: str, rules: Sequence[str] | None, cost: CostModel, cores: SharedCores, bar: tqdm) -> dict:
    """One saved result set, measured and simulated three ways, per configuration."""
    doc = json.loads((RESULTS / set_name / "summary.json").read_text())
    run = doc["config"]["run"]
    pooled = {r["config"]: r for r in pool(doc["reps"]) if rules is None or r["config"] in rules}
    work = WORKLOADS[doc.get("workload", set_name)](run["token_scale"])
    rank = RankConfig(page_size=1, kv_pages=run["pool"], chunk_tokens=4096, decode_reserve_tokens=64)
    modes = {
        "as fitted": (PROFILES["cpu-bench"].cost, None),
        "this machine": (cost, None),
        "shared cores": (cost, cores),
    }
    rows = {}
    for cfg, r in pooled.items():
        row = {
            "measured_ms": r["ttft_ms"]["mean"],
            "measured_per_rep": r["rep_mean_ttft_ms"],
            "measured_split": r["requests_per_rank"],
        }
        for mode, (c, sc) in modes.items():
            row[mode] = dict(zip(("ms", "split"), simulate(work, rank, SIM_RULE.get(cfg, cfg), c, sc), strict=True))
            bar.update()
        rows[cfg] = row
    return {"set": set_name, "token_scale": run["token_scale"], "pool": run["pool"], "configs": rows}


def rank_correlation(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's: the Pearson correlation of the two orders."""
    ra, rb = (np.argsort(np.argsort(x)) for x in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kv-set", default="agentic_kv-scale0.025", help="the result set run beside cpu_contention")
    args = ap.parse_args()
    cost, cores, machine = this_machine()
    kv_configs = len(
        json.loads((RESULTS / args.kv_set / "summary.json").read_text())["config"]["run"]["configs"].split(",")
    )
    with tqdm(total=3 * (len(RULES) * len(WORKLOADS) + kv_configs), desc="fidelity replays") as bar:
        ratios = {wl: replay(wl, RULES, cost, cores, bar) for wl in WORKLOADS}
        kv = replay(args.kv_set, None, cost, cores, bar)

    lines = [
        f"This machine (`cpu_contention.json`): prefill {machine['prefill_x']:.2f}x and decode "
        f"{machine['decode_x']:.2f}x `cpu-bench`'s fitted times; shared-cores factors (a step's time with the "
        "other rank busy / alone): "
        + ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in machine["shared_cores"].items())
        + ".",
        "",
        "kvmul / round_robin mean TTFT (each workload's default set, run on an earlier machine):",
        "",
        "| workload | measured kvmul / rr (ms) | ratio | per repetition | " + SIM_HEADS,
        "|---|---|---|---|" + "---|" * len(MODES),
    ]  # fmt: skip
    for wl, rep in ratios.items():
        k, rr = rep["configs"]["kvmul"], rep["configs"]["round_robin"]
        per = " / ".join(f"{a / b:.2f}" for a, b in zip(k["measured_per_rep"], rr["measured_per_rep"], strict=True))
        sims = " | ".join(f"{k[m]['ms'] / rr[m]['ms']:.2f}" for m in MODES)
        km, rm = k["measured_ms"], rr["measured_ms"]
        lines.append(f"| {wl} | {km:.0f} / {rm:.0f} | {km / rm:.2f} | {per} | {sims} |")
    rows = kv["configs"]
    names = sorted(rows, key=lambda c: rows[c]["measured_ms"])
    corr = {
        m: rank_correlation([rows[c]["measured_ms"] for c in names], [rows[c][m]["ms"] for c in names]) for m in MODES
    }
    lines += [
        "", f"`{args.kv_set}` (token scale {kv['token_scale']}, {kv['pool']}-token pools), every configuration,"
        " mean TTFT ms (requests per rank), best measured first:", "",
        "| configuration | measured | per repetition | " + SIM_HEADS,
        "|---|---|---|" + "---|" * len(MODES),
    ]  # fmt: skip
    for c in names:
        r = rows[c]
        split = "/".join(str(round(x)) for x in r["measured_split"])
        sims = " | ".join(f"{r[m]['ms']:.0f} ({'/'.join(map(str, r[m]['split']))})" for m in MODES)
        per = " / ".join(f"{x:.0f}" for x in r["measured_per_rep"])
        lines.append(f"| {c} | {r['measured_ms']:.0f} ({split}) | {per} | {sims} |")
    reps = list(zip(*(rows[c]["measured_per_rep"] for c in names), strict=True))
    corr["repetitions"] = rank_correlation(reps[0], reps[1]) if len(reps) == 2 else None
    lines.append(
        "| rank correlation with the measured order | 1 | "
        + (f"{corr['repetitions']:+.2f} (the two against each other)" if corr["repetitions"] is not None else "")
        + " | "
        + " | ".join(f"{corr[m]:+.2f}" for m in MODES)
        + " |"
    )
    config = {
        "profile": "cpu-bench",
        "rules": list(RULES),
        "kv_set": args.kv_set,
        "machine": machine,
        "sim_rule": SIM_RULE,
    }
    write_results(
        "sim/fidelity",
        __doc__,
        {"config": config, "ratios": ratios, "kv": kv, "rank_correlation": corr},
        "\n".join(lines),
    )

    plt = pyplot()
    fig, axes = plt.subplots(1, len(MODES), figsize=(12, 4), sharey=True)
    meas = np.array([rows[c]["measured_ms"] for c in names])
    for ax, m in zip(axes, MODES, strict=True):
        sim = np.array([rows[c][m]["ms"] for c in names])
        ax.scatter(sim, meas)
        for c, x, y in zip(names, sim, meas, strict=True):
            ax.annotate(c, (x, y), fontsize=7)
        ax.set_title(f"{m} (rank corr {corr[m]:+.2f})")
        ax.set_xlabel("simulated mean TTFT, ms")
    axes[0].set_ylabel("measured mean TTFT, ms")
    fig.suptitle(f"{args.kv_set}: simulated vs measured, per configuration")
    fig.tight_layout()
    fig.savefig(RESULTS / "sim" / "fidelity.png", dpi=100)


if __name__ == "__main__":
    main()
