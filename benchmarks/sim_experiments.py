"""Cluster-scale experiments in the simulator, one command each (results: benchmarks/results/sim/).

  table       16 ranks; the full Mooncake conversation trace, the agentic and the API workloads;
              every rule -> sim_table.{json,md} + sim_table_<workload>.png
  load-sweep  Mooncake at increasing time compression, the main rules -> sim_load_sweep.{json,md,png}
  scale       4 / 16 / 64 ranks at proportional load -> sim_scale.{json,md,png}
  stress      workloads built to break the product rule; kvmul, the linear sweep and kvmul_guard
              (`sglang_kvmul.core.guard`) -> sim_stress.{json,md,png}

Every rule is the production one (`sglang_kvmul.core.rules` through `KvmulRouter`, fed the simulated
ranks' KV events and load snapshots). Step times come from a cost profile (`sim/cost.py`): the GPU
profiles are rooflines whose efficiency factors are NOT measured (no GPU was lent; see
`gpu_step_times.py`), so absolute numbers are indicative and the comparisons between rules are what
these runs are for. Runs go to a process pool (`--workers`, default 2: this machine's cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time
from collections.abc import Callable
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from tqdm import tqdm

from benchmarks.common import DEFAULT_TRACE, RESULTS, add_trace_arg, pyplot, stats, trace_path, write_results
from sglang_kvmul.sim import workloads
from sglang_kvmul.sim.cost import PROFILES, RooflineCost
from sglang_kvmul.sim.engine import SimConfig, Simulation
from sglang_kvmul.sim.rank import RankConfig

TRACE = DEFAULT_TRACE  # main() sets the --trace argument (the pool's forked workers inherit it)
OUT = RESULTS / "sim"
LINEAR = ["linear:0.1", "linear:0.25", "linear:0.5", "linear:0.75", "linear:0.9"]
# stock SGLang (round_robin, total_requests = load_only with exact counts, total_tokens), vLLM v1's
# balancer, Dynamo's cost, the SGLang gateway's cache_aware, pure affinity, the linear sweep, kvmul
ALL_RULES = [
    "round_robin", "load_only", "total_tokens", "vllm_v1", "dynamo", "sglang_cache_aware", "cache_only",
    *LINEAR, "kvmul", "kvmul_guard",
]  # fmt: skip
LABELS = {"load_only": "load_only (SGLang total_requests)"}

# 16-rank workloads. Mooncake: the whole trace, 8x faster (at 12x the cache-blind rules saturate:
# 93 s mean TTFT). Agentic: 20 requests/s of growing sessions, near capacity without affinity.
# API: 400 system prompts (1.2M tokens: more than one rank's KV pool) at 150 requests/s.
WORKLOADS: dict[str, dict] = {
    "mooncake": {"fraction": 1.0, "time_compression": 8.0},
    "agentic": {"sessions": 240, "turns": 10, "session_rate": 2.0},
    "api": {"requests": 15000, "system_prompts": 400, "system_len": 3000, "question_len": 100, "rate": 150.0},
}


@functools.lru_cache(maxsize=1)  # specs come grouped by workload; the full trace's prompts take ~1 GB
def _workload(name: str, params_json: str) -> list[workloads.TraceRequest]:
    params = json.loads(params_json)
    reqs = workloads.mooncake(TRACE, **params) if name == "mooncake" else getattr(workloads, name)(**params)
    for r in reqs:
        r.input_ids = tuple(r.input_ids)  # the simulator's own form: it keeps this one, no second copy
    return reqs


def scaled_cost(profile: str, scale: dict | None):
    """The profile's cost, its roofline efficiency factors (assumed, not measured) multiplied by
    `scale` (`mfu`, `bw_eff`), each capped at 1.0 (the card's peak)."""
    cost = PROFILES[profile].cost
    if scale and isinstance(cost, RooflineCost):
        mfu = min(1.0, cost.mfu * scale.get("mfu", 1.0))
        cost = dataclasses.replace(cost, mfu=mfu, bw_eff=min(1.0, cost.bw_eff * scale.get("bw_eff", 1.0)))
    return cost


def simulate(spec: dict) -> tuple[Simulation, list, float]:
    """One simulation: the simulation, its finished requests and its wall time (workloads cached per worker)."""
    work = _workload(spec["workload"], json.dumps(spec["params"], sort_keys=True))
    rank = RankConfig(**spec.get("rank", {}))
    # `event_delay_s` (`sim_nuisance`): how long KV events and snapshots take to reach the router
    delay = spec.get("event_delay_s", SimConfig.event_delay_s)
    cfg = SimConfig(ranks=spec["ranks"], rank=rank, rule=spec["rule"], event_delay_s=delay)
    t0 = time.perf_counter()
    sim = Simulation(cfg, scaled_cost(spec["profile"], spec.get("scale")), speeds=spec.get("speeds"))
    reqs = sim.run(work)
    return sim, reqs, time.perf_counter() - t0


def run(spec: dict) -> dict:
    """One simulation -> its summary row (runs in a pool worker)."""
    return summarize(spec, *simulate(spec))


def summarize(spec: dict, sim: Simulation, reqs: list, wall: float) -> dict:
    """A simulation's summary row: the spec, TTFT / TPOT statistics, where the time went, the router's figures."""
    ttft = np.array([r.first_token - r.arrival for r in reqs]) * 1e3
    tpot = np.array([(r.finish - r.first_token) / (r.output_len - 1) for r in reqs if r.output_len > 1]) * 1e3
    work_per_rank = np.zeros(spec["ranks"])
    for r in reqs:
        work_per_rank[r.rank] += len(r.tokens) - r.cached
    return {
        **{k: v for k, v in spec.items() if k not in ("params",)},
        "requests": len(reqs),
        **{f"ttft_{k}_ms": v for k, v in stats(ttft).items()},
        **{f"tpot_{k}_ms": v for k, v in stats(tpot).items()},
        # arrival to last token: what the marginal rules minimise, summed (TTFT and TPOT are judged apart)
        "e2e_mean_ms": float(np.mean([r.finish - r.arrival for r in reqs]) * 1e3),
        **attribution(reqs),
        "hit_ratio": sum(r.cached for r in reqs) / sum(len(r.tokens) for r in reqs),
        "imbalance": float(work_per_rank.max() / max(1.0, work_per_rank.mean())),
        "guard_trips": dict(getattr(sim.router.rule, "trips", {})),
        # the router's measured decode cost at the end (`core.decode_cost`; read by marginal_decode)
        "decode_tokens_per_request": sim.router.decode_cost.tokens_per_request,
        # requests per decode step, over every rank's decode steps (SGLang's decode_moments: sum b / steps):
        # at equal throughput a smaller batch means faster steps, and more requests held in the queue
        "decode_batch_mean": sum(k.decode_moments[1] for k in sim.ranks)
        / max(1.0, sum(k.decode_moments[0] for k in sim.ranks)),
        "sim_wall_s": wall,
        "ttft_hist": np.histogram(np.log10(np.maximum(ttft, 1e-3)), bins=60, range=(-1, 5))[0].tolist(),
    }


def attribution(reqs: list) -> dict:
    """Where each request's time went (means, ms; tokens per request), for `sim_diagnosis`:
    TTFT = queueing (behind other prefills; `behind_kv`: the part of it spent behind a queue head
    that was waiting for KV pages) + KV wait (at the queue head, no room) + prefill (its
    own chunks, and whatever ran between them); TPOT = decoding + stall (decode time lost to
    prefill steps on its rank, per output token); prefill tokens a better-cached rank had
    (affinity) or that were evicted between routing and admission (eviction); and the same split
    of TTFT for the slowest 1% (`tail_*`: what P99 TTFT is made of)."""
    kv_wait = np.array([r.kv_wait for r in reqs])
    behind_kv = np.array([r.kv_blocked for r in reqs]) - kv_wait  # queued behind a head that had no room
    admitted = np.array([r.admitted_at - r.arrival for r in reqs])
    prefill = np.array([r.first_token - r.admitted_at for r in reqs])
    outs = [r for r in reqs if r.output_len > 1]
    stall = np.array([r.stall / (r.output_len - 1) for r in outs])
    ttft = np.array([r.first_token - r.arrival for r in reqs])
    tail = ttft >= np.percentile(ttft, 99)  # the slowest 1%: what sets P99 TTFT
    prompt = np.array([len(r.tokens) for r in reqs])
    uncached = prompt - np.array([r.cached for r in reqs])
    return {
        "ttft_queue_ms": float((admitted - kv_wait).mean() * 1e3),
        "ttft_kv_wait_ms": float(kv_wait.mean() * 1e3),
        "ttft_behind_kv_ms": float(behind_kv.mean() * 1e3),
        "ttft_prefill_ms": float(prefill.mean() * 1e3),
        "tpot_stall_ms": float(stall.mean() * 1e3) if len(outs) else 0.0,
        "affinity_lost_tokens": float(np.mean([r.best_cached - r.predicted_cached for r in reqs])),
        "evicted_tokens": float(np.mean([max(0, r.predicted_cached - r.cached) for r in reqs])),
        "tail_queue_ms": float((admitted - kv_wait)[tail].mean() * 1e3),
        "tail_kv_wait_ms": float(kv_wait[tail].mean() * 1e3),
        "tail_behind_kv_ms": float(behind_kv[tail].mean() * 1e3),
        "tail_prefill_ms": float(prefill[tail].mean() * 1e3),
        "tail_prompt_tokens": float(prompt[tail].mean()),
        "tail_uncached_tokens": float(uncached[tail].mean()),
    }


def run_all(specs: list[dict], workers: int, desc: str, fn: Callable[[dict], dict] | None = None) -> list[dict]:
    """`fn` (default `run`, a module-level function: it goes to the pool's workers) over `specs`, with progress."""
    rows = []
    with Pool(workers, maxtasksperchild=8) as pool:
        for row in tqdm(pool.imap_unordered(fn or run, specs), total=len(specs), desc=desc):
            rows.append(row)
            tqdm.write(
                f"{row['workload']} {row['rule']} x{row.get('load', 1):g} "
                f"r{row['ranks']}: TTFT {row['ttft_mean_ms']:.0f} ms, TPOT {row['tpot_mean_ms']:.1f} ms, "
                f"hit {row['hit_ratio']:.3f} ({row['sim_wall_s']:.0f} s)"
            )
    return rows


def reduction(ours: float, theirs: float) -> str:
    return f"{(ours - theirs) / theirs * 100:+.0f}%"


def best_linear(rows: list[dict]) -> dict:
    return min((r for r in rows if r["rule"].startswith("linear:")), key=lambda r: r["ttft_mean_ms"])


def _row_line(r: dict) -> str:
    name = LABELS.get(r["rule"], r["rule"])
    return (
        f"| {name} | {r['ttft_mean_ms']:.0f} | {r['ttft_p99_ms']:.0f} | {r['tpot_mean_ms']:.1f} | "
        f"{r['tpot_p99_ms']:.1f} | {r['hit_ratio']:.3f} | {r['imbalance']:.2f} |"
    )


HEADER = [
    "| rule | TTFT mean ms | TTFT P99 ms | TPOT mean ms | TPOT P99 ms | hit ratio | work imbalance (max/mean) |",
    "|---|---|---|---|---|---|---|",
]


def versus(rows: list[dict]) -> list[str]:
    """kvmul (and kvmul_guard) against vLLM-v1's balancer and the best linear alpha (the paper's two
    headline baselines)."""
    by = {r["rule"]: r for r in rows}
    v, lin = by.get("vllm_v1"), best_linear(rows)
    out = ["| rule vs baseline | TTFT mean | TTFT P99 | TPOT mean | TPOT P99 |", "|---|---|---|---|---|"]
    for ours in ("kvmul", "kvmul_guard"):
        for name, b in (("vllm_v1", v), (f"best linear ({lin['rule']})", lin)):
            if ours in by and b is not None:
                k = by[ours]
                cells = [reduction(k[m], b[m]) for m in ("ttft_mean_ms", "ttft_p99_ms", "tpot_mean_ms", "tpot_p99_ms")]
                out.append(f"| {ours} vs {name} | " + " | ".join(cells) + " |")
    out.append("| paper (16 GPUs, vLLM-v1 / tuned production linear) | -92% / -52% |  | -21% / -20% |  |")
    return out


def _save(name: str, config: dict, rows: list[dict], md: list[str], doc: str | None = None) -> None:
    """Rows and table under `benchmarks/results/sim/`, headed by `doc` (the writing script's own
    docstring; default this module's)."""
    write_results(f"sim/{name}", doc or __doc__, {"config": config, "rows": rows}, "\n".join(md))


def cmd_table(args: argparse.Namespace) -> None:
    names = args.workloads.split(",")
    specs = [
        {"workload": w, "params": WORKLOADS[w], "ranks": 16, "profile": args.profile, "rule": rule,
         "rank": {"kv_pages": args.kv_tokens // 16}}
        for w in names for rule in args.rules.split(",")
    ]  # fmt: skip
    rows = run_all(specs, args.workers, "table")
    md = []
    plt = pyplot()
    for w in names:
        sub = sorted((r for r in rows if r["workload"] == w), key=lambda r: r["ttft_mean_ms"])
        summary = workloads.summary(_workload(w, json.dumps(WORKLOADS[w], sort_keys=True)))
        md += [f"## {w}: 16 ranks, {args.profile}", "", f"Workload: `{json.dumps(WORKLOADS[w])}`; {summary}", ""]
        md += HEADER + [_row_line(r) for r in sub] + [""] + versus(sub) + [""]
        fig, ax = plt.subplots(figsize=(8, 5))
        edges = np.logspace(-1, 5, 61)
        for r in sub:
            cdf = np.cumsum(r["ttft_hist"]) / r["requests"]
            ax.plot(edges[1:], cdf, label=r["rule"], **_style(r["rule"]))
        ax.set_xscale("log")
        ax.set_xlabel("TTFT (ms)")
        ax.set_ylabel("CDF")
        ax.set_title(f"simulated {w}: 16 ranks, {args.profile} (unmeasured roofline)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(OUT / f"{args.name}_{w}.png", dpi=100)
    _save(args.name, vars(args), rows, md)


def _style(rule: str) -> dict:
    """Our two rules stand out: kvmul thick, kvmul_guard thick and dashed."""
    return {"lw": 2.5, "ls": "--" if rule == "kvmul_guard" else "-"} if rule.startswith("kvmul") else {"lw": 1.0}


def _sweep_plot(rows: list[dict], x: str, xlabel: str, path: Path, title: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for rule in sorted({r["rule"] for r in rows}):
        pts = sorted((r[x], r["ttft_mean_ms"], r["tpot_mean_ms"]) for r in rows if r["rule"] == rule)
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=rule, **_style(rule))
        axes[1].plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=rule, **_style(rule))
    for ax, what in zip(axes, ("mean TTFT (ms)", "mean TPOT (ms)"), strict=True):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(what)
        ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _grouped_table(rows: list[dict], key: str, label: str) -> list[str]:
    md = []
    for value in sorted({r[key] for r in rows}):
        sub = sorted((r for r in rows if r[key] == value), key=lambda r: r["ttft_mean_ms"])
        md += [f"## {label} {value:g}", ""] + HEADER + [_row_line(r) for r in sub] + [""] + versus(sub) + [""]
    return md


def cmd_load_sweep(args: argparse.Namespace) -> None:
    """Half the conversations (to keep the sweep short), compressed twice as much: the load of the
    whole trace at half the compression, which is the x-axis."""
    specs = []
    for c in map(float, args.compressions.split(",")):
        params = {"fraction": 0.5, "time_compression": 2 * c}
        for rule in args.rules.split(","):
            specs.append({"workload": "mooncake", "params": params, "ranks": 16, "profile": args.profile,
                          "rule": rule, "load": c, "rank": {"kv_pages": args.kv_tokens // 16}})  # fmt: skip
    rows = run_all(specs, args.workers, "load sweep")
    _sweep_plot(rows, "load", "trace time compression", OUT / f"{args.name}.png",
                f"Mooncake, 16 ranks, {args.profile} (unmeasured)")  # fmt: skip
    _save(args.name, vars(args), rows, _grouped_table(rows, "load", "time compression"))


def cmd_scale(args: argparse.Namespace) -> None:
    """Proportional load: the share of conversations and the compression grow with the ranks, so
    each rank sees the same request rate as at 16 ranks under `--compression`."""
    specs = []
    for n in map(int, args.ranks.split(",")):
        share = n / 16
        params = (
            {"fraction": share, "time_compression": args.compression}
            if share <= 1
            else {"fraction": 1.0, "time_compression": args.compression * share}
        )
        for rule in args.rules.split(","):
            specs.append({"workload": "mooncake", "params": params, "ranks": n, "profile": args.profile,
                          "rule": rule, "rank": {"kv_pages": args.kv_tokens // 16}})  # fmt: skip
    rows = run_all(specs, args.workers, "scale")
    _sweep_plot(rows, "ranks", "ranks", OUT / f"{args.name}.png",
                f"Mooncake at proportional load, {args.profile} (unmeasured)")  # fmt: skip
    _save(args.name, vars(args), rows, _grouped_table(rows, "ranks", "ranks"))


# Workloads that push on the product rule's assumptions (see the closing notes of issue #5)
STRESS: dict[str, dict] = {
    # half the ranks run at half speed: neither factor knows a rank's speed
    "heterogeneous": {"workload": "api", "speeds": [1.0] * 8 + [0.5] * 8,
                      "params": {"requests": 6000, "system_prompts": 48, "rate": 80.0}},
    # small KV pools: cache affinity piles long prompts onto ranks that must evict or cannot admit
    "kv_pressure": {"workload": "agentic", "rank": {"kv_pages": 120_000 // 16},
                    "params": {"sessions": 240, "session_rate": 2.0}},
    # long outputs on short prompts: decode batch dominates, prefill is cheap
    "long_outputs": {"workload": "api", "params": {"requests": 4000, "system_prompts": 16, "system_len": 1500,
                                                   "question_len": 50, "output_len": 2000, "rate": 20.0}},
    # near-full hits: a huge shared prompt and tiny suffixes make the uncached factor almost zero
    "tiny_suffix": {"workload": "api", "params": {"requests": 8000, "system_prompts": 64, "system_len": 16000,
                                                  "question_len": 16, "output_len": 300, "rate": 100.0}},
}  # fmt: skip


def cmd_stress(args: argparse.Namespace) -> None:
    specs = []
    for case in args.cases.split(","):
        base = STRESS[case]
        for rule in args.rules.split(","):
            specs.append({"case": case, "ranks": 16, "profile": args.profile, "rule": rule,
                          "rank": base.get("rank", {"kv_pages": args.kv_tokens // 16}), **base})  # fmt: skip
    rows = run_all(specs, args.workers, "stress")
    md = []
    for case in args.cases.split(","):
        sub = sorted((r for r in rows if r["case"] == case), key=lambda r: r["ttft_mean_ms"])
        md += [f"## {case}", "", f"`{json.dumps(STRESS[case])}`", ""] + HEADER + [_row_line(r) for r in sub]
        guarded = next(r for r in sub if r["rule"] == "kvmul_guard")
        md += ["", f"Guard trips (decisions the guard changed): {guarded['guard_trips']}", "", *versus(sub), ""]
    plt = pyplot()
    cases = args.cases.split(",")
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / 3
    for i, (label, pick) in enumerate(
        [
            ("kvmul", lambda s: next(r for r in s if r["rule"] == "kvmul")),
            ("best linear", best_linear),
            ("kvmul_guard", lambda s: next(r for r in s if r["rule"] == "kvmul_guard")),
        ]
    ):
        vals = [pick([r for r in rows if r["case"] == c])["ttft_mean_ms"] for c in cases]
        ax.bar(np.arange(len(cases)) + i * width, vals, width, label=label)
    ax.set_xticks(np.arange(len(cases)) + width, cases)
    ax.set_yscale("log")
    ax.set_ylabel("mean TTFT (ms)")
    ax.legend()
    ax.set_title(f"stress cases, 16 ranks, {args.profile} (unmeasured)")
    fig.tight_layout()
    fig.savefig(OUT / f"{args.name}.png", dpi=100)
    _save(args.name, vars(args), rows, md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    commands: dict[str, tuple[Callable[[argparse.Namespace], None], str]] = {
        "table": (cmd_table, ",".join(ALL_RULES)),
        "load-sweep": (
            cmd_load_sweep,
            "round_robin,vllm_v1,dynamo,sglang_cache_aware,linear:0.25,linear:0.5,linear:0.75,kvmul,kvmul_guard",
        ),
        "scale": (cmd_scale, "vllm_v1,sglang_cache_aware,linear:0.25,linear:0.5,kvmul,kvmul_guard"),
        "stress": (cmd_stress, "vllm_v1,linear:0.1,linear:0.25,linear:0.5,linear:0.75,linear:0.9,kvmul,kvmul_guard"),
    }
    for name, (fn, rules) in commands.items():
        p = sub.add_parser(name)
        p.set_defaults(fn=fn)
        p.add_argument("--rules", default=rules)
        p.add_argument("--profile", default="h100-qwen2.5-7b", choices=sorted(PROFILES))
        p.add_argument("--kv-tokens", type=int, default=None, help="KV pool per rank (default: the profile's)")
        p.add_argument("--workers", type=int, default=2)
        p.add_argument("--name", default=f"sim_{name.replace('-', '_')}")
        add_trace_arg(p)
    sub.choices["table"].add_argument("--workloads", default=",".join(WORKLOADS))
    sub.choices["load-sweep"].add_argument("--compressions", default="4,8,12,16", help="of the whole trace")
    sub.choices["scale"].add_argument("--ranks", default="4,16,64")
    sub.choices["scale"].add_argument("--compression", type=float, default=8.0, help="at 16 ranks (the table's)")
    sub.choices["stress"].add_argument("--cases", default=",".join(STRESS))
    args = ap.parse_args()
    if args.kv_tokens is None:
        args.kv_tokens = PROFILES[args.profile].kv_tokens
    global TRACE
    if args.cmd in ("load-sweep", "scale") or "mooncake" in getattr(args, "workloads", ""):
        TRACE = trace_path(args.trace)  # checked here: a pool worker cannot exit with the message
    fn = args.fn
    del args.fn
    fn(args)


if __name__ == "__main__":
    main()
