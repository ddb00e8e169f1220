"""Why a rule loses where it loses: each case's TTFT and TPOT split into causes, rule by rule.

For each case (16 ranks, simulated) every rule runs on the same workload; `sim_experiments.attribution`
splits each request's time: TTFT = queueing behind other prefills + KV wait (at the queue head with
no room in the pool) + its own prefill (also for the slowest 1%, what P99 TTFT is made of); TPOT =
decoding + stall (decode time lost to prefill steps on its rank); and the prefill tokens a
better-cached rank had (affinity) or that were evicted between routing and admission. The tables
then set each compared rule (`--compare`: the default and the other candidates) against the best of
the linear sweep and Dynamo's rule for each metric, cause by cause, and against the issue's bar
(`GATES`); a last table says which rules (the baselines too) meet the bar at all. Results:
benchmarks/results/sim/sim_diagnosis*.{json,md,png}.

Step times come from the cost profiles of `sim/cost.py`: the GPU rooflines' efficiency factors are
assumed, not measured (`--mfu-scale` / `--bw-scale` move them, `--cost-scales 0.5,2` repeats each case
with both halved and doubled, capped at the card's peak); `--mixed-chunk` runs the ranks with
SGLang's --enable-mixed-chunk; `--seeds` repeats each case on other workload seeds.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable

import numpy as np

from benchmarks import sim_experiments as sx
from benchmarks.common import add_trace_arg, geo_mean, panel_grid, trace_path
from sglang_kvmul.core.rules import DEFAULT_RULE
from sglang_kvmul.sim.cost import PROFILES
from sglang_kvmul.sim.engine import SimConfig

_7B, _MOE = "h100-qwen2.5-7b", "h100-qwen3-30b-a3b"


def _table_case(workload: str, profile: str) -> dict:
    return {"workload": workload, "params": sx.WORKLOADS[workload], "profile": profile}


def _sweep_case(compression: float) -> dict:  # as `sim_experiments load-sweep`: half the trace, twice as fast
    return {"workload": "mooncake", "params": {"fraction": 0.5, "time_compression": 2 * compression}, "profile": _7B}


# The grid: the 16-rank table (3 workloads x 2 model shapes), the stress set, the load sweep
CASES: dict[str, dict] = {
    **{f"{w}_{tag}": _table_case(w, prof) for w in sx.WORKLOADS for tag, prof in (("7b", _7B), ("moe", _MOE))},
    **{f"stress_{name}": {**spec, "profile": _7B} for name, spec in sx.STRESS.items()},
    **{f"sweep_{c:g}x": _sweep_case(c) for c in (4.0, 12.0, 16.0)},  # 8x: the table's mooncake_7b
}
GATES = {"ttft_mean_ms": 1.05, "tpot_mean_ms": 1.05, "ttft_p99_ms": 1.1}  # the bar, vs the best baseline
BASELINES = [*sx.LINEAR, "dynamo"]
CANDIDATES = list(
    dict.fromkeys(
        [
            DEFAULT_RULE,
            "marginal_fresh",
            "marginal_behind",
            "marginal_behind_held",
            "marginal_room_timed",
            "marginal_room",
            "marginal_chunked",
            "marginal_timed",
            "marginal_persist",
            "marginal_shared",
            "marginal_turnover",
            "marginal_rebalance",
            "marginal_bounded",
            "marginal_decode",
            "marginal_capped",
            "marginal_latency",
            "kvmul_excess",
            "kvmul",
        ]
    )
)
COMPONENTS = [
    ("ttft_mean_ms", "TTFT"), ("ttft_queue_ms", "queue"), ("ttft_behind_kv_ms", "of it behind KV wait"),
    ("ttft_kv_wait_ms", "KV wait"), ("ttft_prefill_ms", "prefill"), ("tpot_mean_ms", "TPOT"),
    ("tpot_stall_ms", "stall"),
    ("hit_ratio", "hit"), ("affinity_lost_tokens", "affinity lost tok"), ("evicted_tokens", "evicted tok"),
    ("decode_batch_mean", "decode batch"),
]  # fmt: skip
# the slowest 1% of requests, split the same way (rows of runs before these were recorded have none)
TAIL = [
    ("ttft_p99_ms", "P99 TTFT"), ("tail_queue_ms", "queue"), ("tail_behind_kv_ms", "of it behind KV wait"),
    ("tail_kv_wait_ms", "KV wait"), ("tail_prefill_ms", "prefill"), ("tail_prompt_tokens", "prompt tok"),
    ("tail_uncached_tokens", "uncached tok"),
]  # fmt: skip


def _specs(args: argparse.Namespace) -> list[dict]:
    specs = []
    for case in args.cases.split(","):
        base = CASES[case]
        profile = args.profile or base["profile"]
        rank = {"kv_pages": PROFILES[profile].kv_tokens // 16, **base.get("rank", {}), "mixed_chunk": args.mixed_chunk}
        for seed in range(args.seeds):
            params = {**base["params"]}
            if seed and base["workload"] != "mooncake":
                params["seed"] = seed
            elif seed:
                # another 90% of the conversations the case uses (a sweep's half trace stays a half)
                params["seed"], params["fraction"] = seed, 0.9 * params.get("fraction", 1.0)
            for eff in map(float, args.cost_scales.split(",")):
                label = case if eff == 1.0 else f"{case}@eff{eff:g}"
                scale = {"mfu": args.mfu_scale * eff, "bw_eff": args.bw_scale * eff}
                for rule in args.rules.split(","):
                    specs.append({"case": label, "seed": seed, "workload": base["workload"], "params": params,
                                  "ranks": 16, "profile": profile, "rule": rule, "rank": rank,
                                  "speeds": base.get("speeds"), "scale": scale})  # fmt: skip
    return specs


def point_specs(points: str, rules: str) -> list[dict]:
    """The run specs of named points (`case|seed|mixed 0/1|efficiency factor`, ';'-separated), one per
    rule: for runs that need one point of a case, not all its seeds and factors."""
    out = []
    for point in points.split(";"):
        case, seed, mixed, eff = point.split("|")
        args = ["--cases", case, "--seeds", str(int(seed) + 1), "--cost-scales", eff, "--rules", rules]
        out += [
            s for s in _specs(parser().parse_args(args + ["--mixed-chunk"] * (mixed == "1"))) if s["seed"] == int(seed)
        ]
    return out


def _cell(v: float | None, k: str, sign: str = "") -> str:
    """A component's value ("-" for rows recorded before it was)."""
    return "-" if v is None else f"{v:{sign}.{3 if k == 'hit_ratio' else 1}f}"


def _line(r: dict) -> str:
    return f"| {r['rule']} | " + " | ".join(_cell(r.get(k), k) for k, _ in COMPONENTS) + " |"


def tail(sub: list[dict]) -> list[str]:
    """One case's slowest 1% per rule (by P99 TTFT): whether it is queueing or their own prefill (means
    over those requests: they add up to their mean TTFT, above the P99 itself)."""
    sub = sorted((r for r in sub if "tail_queue_ms" in r), key=lambda r: r["ttft_p99_ms"])
    if not sub:
        return []
    head = ["| slowest 1%: rule | " + " | ".join(n for _, n in TAIL) + " |", "|---" * (len(TAIL) + 1) + "|"]
    return head + [
        f"| {r['rule']} | " + " | ".join("-" if k not in r else f"{r[k]:.0f}" for k, _ in TAIL) + " |" for r in sub
    ]


def versus(rows: list[dict], rule: str) -> list[str]:
    """`rule` against the best baseline on each headline metric, cause by cause."""
    found = _against_best(rows, rule)
    if found is None:
        return []
    ours, ratios, best = found
    out = [f"| {rule} minus the best on ... | " + " | ".join(n for _, n in COMPONENTS) + " |",
           "|---" * (len(COMPONENTS) + 1) + "|"]  # fmt: skip
    for metric, b in best.items():
        diffs = [_cell(ours[k] - b[k] if k in ours and k in b else None, k, "+") for k, _ in COMPONENTS]
        out.append(f"| {metric} ({b['rule']}, {rule} at {ratios[metric]:.2f}x) | " + " | ".join(diffs) + " |")
    return out


def _key(spec: dict) -> str:
    """What makes two runs the same run (the rule, case, seed, rank config and cost scale, and the
    KV-event delay where a run set one other than the simulator's default: `sim_nuisance`'s 1 / 3 ms
    rows are not the stored rows, its rows at the default delay are)."""
    key = [spec[k] for k in ("case", "seed", "rule", "rank", "scale", "profile")]
    delay = spec.get("event_delay_s", SimConfig.event_delay_s)
    return json.dumps(key if delay == SimConfig.event_delay_s else [*key, delay], sort_keys=True)


def with_own(reuse: str, name: str) -> str:
    """`reuse` with the result set `name` first, if it exists: a re-run under the same name redoes
    only the runs it does not hold (`sim_frontier`, `sim_nuisance`)."""
    if (sx.OUT / f"{name}.json").exists() and name not in reuse.split(","):
        return f"{name},{reuse}"
    return reuse


def _reused(names: str, specs: list[dict]) -> list[dict]:
    """Rows of earlier runs (`--reuse a,b`) that this run would repeat: the baselines do not change
    when a candidate rule does, so a new candidate runs alone."""
    wanted = {_key(s) for s in specs}
    rows = []
    for name in names.split(","):
        doc = json.loads((sx.OUT / f"{name}.json").read_text())
        rows += [r for r in doc["rows"] if _key(r) in wanted and _key(r) not in {_key(x) for x in rows}]
    return rows


def _against_best(
    sub: list[dict], rule: str, metrics: Iterable[str] = GATES
) -> tuple[dict, dict[str, float], dict[str, dict]] | None:
    """For one case and seed: `rule`'s row, its value over the best baseline's per metric (those of
    `GATES` unless told), and the best baseline's row per metric (None if either is missing)."""
    base = [r for r in sub if r["rule"] in BASELINES and all(m in r for m in metrics)]
    ours = next((r for r in sub if r["rule"] == rule and all(m in r for m in metrics)), None)
    if ours is None or not base:
        return None
    best = {m: min(base, key=lambda r, m=m: r[m]) for m in metrics}
    return ours, {m: ours[m] / best[m][m] for m in metrics}, best


def _ratios(rows: list[dict], rule: str) -> list[tuple[str, int, dict[str, float]]]:
    """(case, seed, {metric: rule's value / the best baseline's}) for every case the rule ran."""
    out = []
    for case, seed in sorted({(r["case"], r["seed"]) for r in rows}):
        found = _against_best([r for r in rows if r["case"] == case and r["seed"] == seed], rule)
        if found is not None:
            out.append((case, seed, found[1]))
    return out


def meets(ratios: dict[str, float]) -> bool:
    """Whether a rule's ratios to the best baseline are all within the issue's bar (`GATES`)."""
    return all(ratios[m] <= g for m, g in GATES.items())


def rule_stats(rows: list[dict], rule: str) -> dict | None:
    """`rule` over every case and seed it ran: how many meet the bar, and per metric the geometric
    mean of its ratios and the worst one with its case (None if it ran nowhere)."""
    rs = _ratios(rows, rule)
    if not rs:
        return None
    worst = {m: max(rs, key=lambda x, m=m: x[2][m]) for m in GATES}
    return {
        "rule": rule, "met": sum(meets(r) for _, _, r in rs), "points": len(rs),
        "geo": {m: geo_mean([r[m] for _, _, r in rs]) for m in GATES},
        "worst": {m: w[2][m] for m, w in worst.items()}, "worst_case": {m: w[0] for m, w in worst.items()},
    }  # fmt: skip


def summary(rows: list[dict], rules: list[str]) -> list[str]:
    """Per rule: how many cases meet the bar, the geometric mean of each ratio, and the worst one."""
    out = ["| rule | cases meeting the bar | " + " | ".join(f"{m} geo-mean / worst" for m in GATES) + " |",
           "|---" * (len(GATES) + 2) + "|"]  # fmt: skip
    for st in filter(None, (rule_stats(rows, rule) for rule in rules)):
        cells = [f"{st['geo'][m]:.2f} / {st['worst'][m]:.2f} ({st['worst_case'][m]})" for m in GATES]
        out.append(f"| {st['rule']} | {st['met']} of {st['points']} | " + " | ".join(cells) + " |")
    return out


def verdict(rows: list[dict], rules: list[str]) -> list[str]:
    """Each compared rule against the best baseline per metric and case: the ratio, and whether it
    meets the bar (`GATES`)."""
    out = ["| case | seed | rule | " + " | ".join(f"{m} / best (<= {g})" for m, g in GATES.items()) + " | meets |",
           "|---" * (len(GATES) + 4) + "|"]  # fmt: skip
    for case, seed in sorted({(r["case"], r["seed"]) for r in rows}):
        sub = [r for r in rows if r["case"] == case and r["seed"] == seed]
        for rule in rules:
            found = _against_best(sub, rule)
            if found is None:
                continue
            _, ratios, best = found
            cells = [f"{ratios[m]:.2f} ({best[m]['rule']})" for m in GATES]
            ok = meets(ratios)
            out.append(f"| {case} | {seed} | {rule} | " + " | ".join(cells) + f" | {'yes' if ok else 'NO'} |")
    return out


def over_the_bar(sub: list[dict]) -> dict[str, dict[str, float]]:
    """For one case and seed, every rule that ran (the baselines too, against the best baseline per
    metric, themselves included): its ratios over the gates (<= 1 everywhere: it meets the bar)."""
    over = {}
    for r in sub:
        found = _against_best(sub, r["rule"])
        if found is not None:
            over[r["rule"]] = {m: found[1][m] / g for m, g in GATES.items()}
    return over


def nearest(sub: list[dict]) -> dict[str, tuple[float, str] | None]:
    """Per gated metric: the lowest ratio over its gate among the rules within the other two gates,
    and the rule (None: no rule is within the other two). All three above 1: no rule meets the bar."""
    over = over_the_bar(sub)
    out: dict[str, tuple[float, str] | None] = {}
    for m in GATES:
        ok = [(o[m], rule) for rule, o in over.items() if all(v <= 1.0 for k, v in o.items() if k != m)]
        out[m] = min(ok) if ok else None
    return out


def reachable(rows: list[dict]) -> list[str]:
    """Per case and seed, the rules that meet the bar (`over_the_bar`), or, when none does, the one
    nearest to it (the smallest worst ratio over its gate): where none meets it, the bar asks for a
    point that no rule in the tables reaches."""
    out = ["| case | seed | rules meeting the bar | nearest when none: rule (TTFT / TPOT / P99 over the bar) |",
           "|---|---|---|---|"]  # fmt: skip
    for case, seed in sorted({(r["case"], r["seed"]) for r in rows}):
        over = over_the_bar([r for r in rows if r["case"] == case and r["seed"] == seed])
        meeting = [rule for rule, o in over.items() if max(o.values()) <= 1.0]
        if meeting:
            out.append(f"| {case} | {seed} | {', '.join(meeting)} | |")
        elif over:
            rule, o = min(over.items(), key=lambda kv: max(kv[1].values()))
            out.append(f"| {case} | {seed} | none | {rule} (" + " / ".join(f"{v:.2f}" for v in o.values()) + ") |")
    return out


def e2e(rows: list[dict], rules: list[str]) -> list[str]:
    """Mean arrival-to-last-token latency per case and seed, each compared rule over the best
    baseline's: what the marginal rules minimise summed, beside the two means the bar judges apart
    (mean TPOT weighs a 10-token answer like a 1,000-token one). Rows of runs before it was
    recorded have none."""
    if not any("e2e_mean_ms" in r for r in rows):
        return []
    m = "e2e_mean_ms"
    out = ["| case | seed | best baseline, ms | " + " | ".join(rules) + " |", "|---" * (len(rules) + 3) + "|"]
    for case, seed in sorted({(r["case"], r["seed"]) for r in rows}):
        sub = [r for r in rows if r["case"] == case and r["seed"] == seed]
        found = [_against_best(sub, rule, (m,)) for rule in rules]
        if None in found:
            continue
        best = found[0][2][m]
        cells = [f"{f[1][m]:.2f}" for f in found]
        out.append(f"| {case} | {seed} | {best[m]:.0f} ({best['rule']}) | " + " | ".join(cells) + " |")
    return out


def parser(doc: str | None = None) -> argparse.ArgumentParser:
    """The command line (also `sim_frontier`'s, under its own doc and defaults)."""
    ap = argparse.ArgumentParser(description=doc or __doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES), help=f"of {', '.join(CASES)}")
    ap.add_argument("--rules", default=",".join([*CANDIDATES, *BASELINES]))
    ap.add_argument("--compare", default=",".join(CANDIDATES), help="the rules set against the best baseline")
    ap.add_argument("--profile", default=None, help="override each case's profile")
    ap.add_argument("--mixed-chunk", action="store_true")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--mfu-scale", type=float, default=1.0, help="roofline prefill efficiency x this")
    ap.add_argument("--bw-scale", type=float, default=1.0, help="roofline decode bandwidth efficiency x this")
    ap.add_argument("--cost-scales", default="1", help="also run with both efficiency factors x each (0.5,2)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--name", default="sim_diagnosis")
    ap.add_argument("--reuse", default=None, help="earlier results (names) whose identical runs are not repeated")
    add_trace_arg(ap)
    return ap


def collect(args: argparse.Namespace) -> list[dict]:
    """Every run the arguments name: the rows `--reuse` already has, the others simulated."""
    if any(CASES[c]["workload"] == "mooncake" for c in args.cases.split(",")):
        sx.TRACE = trace_path(args.trace)  # checked here: a pool worker cannot exit with the message
    return run_or_reuse(_specs(args), args.reuse, args.workers, "diagnosis")


def run_or_reuse(
    specs: list[dict], reuse: str | None, workers: int, desc: str, fn: Callable[[dict], dict] | None = None
) -> list[dict]:
    """The rows of `specs`: those the named earlier results (`reuse`) already have, the others simulated
    (by `fn`, default `sim_experiments.run`)."""
    reused = _reused(reuse, specs) if reuse else []
    done = {_key(r) for r in reused}
    return reused + sx.run_all([s for s in specs if _key(s) not in done], workers, desc, fn)


def main() -> None:
    args = parser().parse_args()
    rows = collect(args)
    compare = args.compare.split(",")
    md = ["## Summary", "", *summary(rows, compare), "", "## Verdict", "", *verdict(rows, compare), ""]
    md += ["## Which rules meet the bar at all (every rule that ran, against the best baseline per metric)", "",
           *reachable(rows), ""]  # fmt: skip
    if table := e2e(rows, compare):
        md += ["## Mean end-to-end latency / the best baseline's (not part of the bar)", "", *table, ""]
    for case, seed in sorted({(r["case"], r["seed"]) for r in rows}):
        sub = sorted((r for r in rows if r["case"] == case and r["seed"] == seed), key=lambda r: r["ttft_mean_ms"])
        md += [f"## {case}, seed {seed}", "", "| rule | " + " | ".join(n for _, n in COMPONENTS) + " |",
               "|---" * (len(COMPONENTS) + 1) + "|", *map(_line, sub), ""]  # fmt: skip
        if lines := tail(sub):
            md += [*lines, ""]
        for rule in compare:
            md += [*versus(sub, rule), ""]
    _plot(rows, args)
    sx._save(args.name, vars(args), rows, md, __doc__)


def _plot(rows: list[dict], args: argparse.Namespace) -> None:
    """TTFT split into causes, per rule within 5x of the fastest, one panel per case (seed 0)."""
    cases = sorted({r["case"] for r in rows})
    fig, axes = panel_grid(len(cases), 4, 5, 4.2)
    for ax, case in zip(axes, cases, strict=True):
        sub = sorted((r for r in rows if r["case"] == case and r["seed"] == 0), key=lambda r: r["ttft_mean_ms"])
        sub = [r for r in sub if r["ttft_mean_ms"] <= 5 * sub[0]["ttft_mean_ms"]]  # the rest is off the scale
        x = np.arange(len(sub))
        bottom = np.zeros(len(sub))
        for key, label in (("ttft_queue_ms", "queue"), ("ttft_kv_wait_ms", "KV wait"), ("ttft_prefill_ms", "prefill")):
            vals = np.array([r[key] for r in sub])
            ax.bar(x, vals, bottom=bottom, label=label)
            bottom += vals
        ax.set_xticks(x, [r["rule"] for r in sub], rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("mean TTFT (ms), stacked by cause")
        ax.set_title(f"{case}{' (mixed chunks)' if args.mixed_chunk else ''}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(sx.OUT / f"{args.name}.png", dpi=100)


if __name__ == "__main__":
    main()
