"""Issue 14's bar on a trace the rules were not developed on: a held-out Mooncake-format trace.

Every rule here was designed and screened on the Mooncake conversation trace and the built-in
workloads (`sim_tally`'s 88 points). This runs `sim_diagnosis`'s Mooncake cases (by default Mooncake
8x on the 7B shape and the 4x and 12x load sweep, on three workload seeds) on another public trace
in the same format, `--trace` (required: the trace is not shipped here, so that it stays held out).
The one used for `sim_heldout.md`: the FAST'25 synthetic trace of kvcache-ai/Mooncake @ 3b5a5941,
`FAST25-release/traces/synthetic_trace.jsonl` (Apache-2.0; 3,993 requests over 17 min, prompts
15.3k tokens on average, 65% reuse with an unbounded cache, outputs 149 tokens on average and 69 at
the median, 13% under five). The issue's "second public Mooncake-format trace" matches it: the
product's TPOT there is 1.67x alpha 0.5's, as the issue reports.

Each run also splits TPOT by output length, the requests with fewer than `SHORT` output tokens
against the rest: the mean TPOT is a mean over requests, and a pause of t costs a request t / (output
- 1) of it, so the few-token answers can make most of it. This is a reporting split, not a rule
input. The best baseline (the linear sweep, Dynamo's rule) is taken per point on the same trace.
Cost factors: the cases' roofline profiles, efficiency factors assumed (x1 unless `--cost-scales`).
Results: benchmarks/results/sim/sim_heldout.{json,md,png}.
"""

from __future__ import annotations

import hashlib

import numpy as np

from benchmarks import sim_diagnosis as sd
from benchmarks import sim_experiments as sx
from benchmarks.common import panel_grid, trace_path, write_results
from benchmarks.sim_cold_tail import _at
from sglang_kvmul.core.rules import DEFAULT_RULE

# Mooncake 8x on the 7B shape and the load sweep's ends (`--cases` takes any of `sim_diagnosis`'s
# Mooncake cases: mooncake_moe, sweep_16x)
CASES = ["mooncake_7b", "sweep_4x", "sweep_12x"]
# the default, the default of stops 40-41, the paper's product, and the baselines
RULES = list(dict.fromkeys([DEFAULT_RULE, "marginal_behind_held", "kvmul", *sd.BASELINES]))
SHORT = 20  # outputs of fewer tokens count as few-token answers


def outputs(spec: dict) -> dict:
    """One run's summary row plus TPOT by output length (a pool worker)."""
    sim, reqs, wall = sx.simulate(spec)
    return {**sx.summarize(spec, sim, reqs, wall), **output_classes(reqs)}


def output_classes(reqs: list) -> dict:
    """Mean TPOT and decode stall of the requests with fewer than SHORT output tokens and of the rest
    (those with two or more, as TPOT counts them), and the short ones' share of the mean TPOT."""
    rs = [r for r in reqs if r.output_len > 1]
    out = np.array([r.output_len for r in rs])
    tpot = np.array([(r.finish - r.first_token) / (r.output_len - 1) for r in rs]) * 1e3
    stall = np.array([r.stall for r in rs]) * 1e3
    short = out < SHORT
    row: dict = {"short_requests": int(short.sum()), "short_tpot_share": float(tpot[short].sum() / tpot.sum())}
    for tag, m in (("short", short), ("long_output", ~short)):
        row[f"{tag}_tpot_mean_ms"] = float(tpot[m].mean()) if m.any() else None
        row[f"{tag}_stall_ms"] = float(stall[m].mean()) if m.any() else None
    return row


def main() -> None:
    ap = sd.parser(__doc__)
    ap.set_defaults(cases=",".join(CASES), rules=",".join(RULES), seeds=3, name="sim_heldout")
    args = ap.parse_args()
    if args.trace == sd.parser().get_default("trace"):
        raise SystemExit("sim_heldout needs --trace: a Mooncake-format trace other than the shipped one")
    sx.TRACE = trace_path(args.trace)  # set before the pool forks: its workers read the trace
    args.trace_sha256 = hashlib.sha256(args.trace.read_bytes()).hexdigest()
    rows = sd.run_or_reuse(sd._specs(args), None, args.workers, "heldout", outputs)  # never reuse: other trace
    compare = [r for r in RULES if r not in sd.BASELINES]
    md = ["## Summary", "", *sd.summary(rows, compare), "", "## Verdict", "", *sd.verdict(rows, compare), ""]
    md += ["## Which rules meet the bar at all", "", *sd.reachable(rows), ""]
    md += [
        f"## TPOT by output length (fewer than {SHORT} output tokens against the rest)",
        "",
        "| point | rule | TPOT ms (/ best baseline) | short outputs: requests, share of the mean TPOT "
        "| short: TPOT / stall ms | the rest: TPOT / stall ms |",
        "|---|---|---|---|---|---|",
    ]
    points = sorted({(r["case"], r["seed"]) for r in rows})
    for case, seed in points:
        sub = sorted(_at(rows, case, seed), key=lambda r: r["tpot_mean_ms"])
        best = min(r["tpot_mean_ms"] for r in sub if r["rule"] in sd.BASELINES)
        md += [
            f"| {case}, seed {seed} | {r['rule']} | {r['tpot_mean_ms']:.1f} ({r['tpot_mean_ms'] / best:.2f}) "
            f"| {r['short_requests']}, {r['short_tpot_share']:.2f} "
            f"| {r['short_tpot_mean_ms']:.0f} / {r['short_stall_ms']:.0f} "
            f"| {r['long_output_tpot_mean_ms']:.1f} / {r['long_output_stall_ms']:.0f} |"
            for r in sub
        ]
    _plot(rows, points, compare, args.name)
    config = {k: str(v) if k == "trace" else v for k, v in vars(args).items()}
    write_results(f"sim/{args.name}", __doc__, {"config": config, "rows": rows}, "\n".join(md))


def _plot(rows: list[dict], points: list[tuple[str, int]], compare: list[str], name: str) -> None:
    """Per point: each rule's mean TTFT and TPOT over the best baseline's, the bar's box drawn."""
    fig, axes = panel_grid(len(points), 5, 3.6, 3.2)
    for ax, (case, seed) in zip(axes, points, strict=True):
        sub = _at(rows, case, seed)
        best = {k: min(r[k] for r in sub if r["rule"] in sd.BASELINES) for k in sd.GATES}
        for r in sub:
            x, y = r["ttft_mean_ms"] / best["ttft_mean_ms"], r["tpot_mean_ms"] / best["tpot_mean_ms"]
            ax.scatter(x, y, **sx._style(r["rule"]))
            if r["rule"] in compare or r["rule"] == "linear:0.5":
                ax.annotate(r["rule"], (x, y), fontsize=6)
        ax.axvline(sd.GATES["ttft_mean_ms"], color="grey", lw=0.6, ls="--")
        ax.axhline(sd.GATES["tpot_mean_ms"], color="grey", lw=0.6, ls="--")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{case}, seed {seed}", fontsize=8)
        ax.set_xlabel("mean TTFT / best baseline", fontsize=7)
        ax.set_ylabel("mean TPOT / best baseline", fontsize=7)
    fig.tight_layout()
    fig.savefig(sx.OUT / f"{name}.png", dpi=110)


if __name__ == "__main__":
    main()
