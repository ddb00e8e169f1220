"""What tuning could reach where no rule meets issue 14's bar: the points of `sim_tally` that no rule
meets, run again with a family of tuned rules (weights fitted per case, which the default may not
use): linear alphas between the sweep's, Dynamo's prefill weight (its overlap_score_weight) from
0.25 to 4, and `marginal_decode` with its decode cost scaled 0.5x to 8x. The bar stays the one
`sim_diagnosis` judges by (the best of the five linear alphas and Dynamo's rule as shipped), so a
tuned rule that meets it shows the point can be reached with these inputs; none meeting it on any
seed is the evidence the issue's "no rule can win" clause asks for. Per point, the tables give each
metric's best ratio among the rules within the other two gates (how near any rule gets on that
metric without giving up the others) and the rules on the TTFT-TPOT Pareto front. Results:
benchmarks/results/sim/sim_frontier*.{json,md,png}.

Simulated, 16 ranks; the step times are `sim/cost.py`'s rooflines (efficiency factors assumed; see
`sim_diagnosis_costs` for them halved and doubled).
"""

from __future__ import annotations

import argparse

from benchmarks import sim_diagnosis as sd
from benchmarks import sim_experiments as sx
from benchmarks.common import pyplot, trace_path, write_results
from benchmarks.sim_tally import SETS  # the result sets that already hold the untuned rules' runs
from benchmarks.sim_tally import points as stored_points

TUNED = [
    *(f"linear:{a:g}" for a in (0.3, 0.4, 0.6)),
    *(f"dynamo:{w:g}" for w in (0.25, 0.5, 2, 4)),
    *(f"marginal_decode:{s:g}" for s in (0.5, 2, 4, 8)),
]


def pareto(sub: list[dict]) -> list[dict]:
    """The rows no other row beats on both mean TTFT and mean TPOT, by mean TTFT."""

    def beats(o: dict, r: dict) -> bool:
        a, b = (o["ttft_mean_ms"], o["tpot_mean_ms"]), (r["ttft_mean_ms"], r["tpot_mean_ms"])
        return a != b and a[0] <= b[0] and a[1] <= b[1]

    return sorted((r for r in sub if not any(beats(o, r) for o in sub)), key=lambda r: r["ttft_mean_ms"])


def report(rows: list[dict]) -> list[str]:
    """The nearest-per-metric table and each point's Pareto front, over the gates."""
    md = ["| case | seed | " + " | ".join(f"best {m} / gate within the other two" for m in sd.GATES) + " |",
          "|---" * (len(sd.GATES) + 2) + "|"]  # fmt: skip
    points = sorted({(r["case"], r["seed"]) for r in rows})
    for case, seed in points:
        near = sd.nearest([r for r in rows if r["case"] == case and r["seed"] == seed])
        cells = [f"{v[0]:.2f} ({v[1]})" if v else "none" for v in near.values()]
        md.append(f"| {case} | {seed} | " + " | ".join(cells) + " |")
    md += ["", "Each point's TTFT-TPOT Pareto front (rules no other beats on both means): ratios over the gates, "
           "and requests per decode step (b):", ""]  # fmt: skip
    md += ["| case | seed | rule: TTFT / TPOT / P99 over the gates (b) |", "|---|---|---|"]
    for case, seed in points:
        sub = [r for r in rows if r["case"] == case and r["seed"] == seed]
        over = sd.over_the_bar(sub)
        front = [r for r in pareto(sub) if r["rule"] in over]
        cells = []
        for r in front:
            b = f" ({r['decode_batch_mean']:.1f})" if r.get("decode_batch_mean") else ""
            cells.append(f"{r['rule']} " + " / ".join(f"{v:.2f}" for v in over[r["rule"]].values()) + b)
        md.append(f"| {case} | {seed} | " + "; ".join(cells) + " |")
    return md


def _plot(rows: list[dict], name: str) -> None:
    """Mean TTFT against mean TPOT, over their gates, per point; the bar's box is the lower-left
    quadrant; a hollow marker is over the P99 gate."""
    plt = pyplot()
    points = sorted({(r["case"], r["seed"]) for r in rows})
    cols = min(3, len(points))
    n_rows = -(-len(points) // cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(5.5 * cols, 4.5 * n_rows), squeeze=False)
    for ax in axes.flat[len(points) :]:
        ax.set_visible(False)
    family = {"linear": "tab:blue", "dynamo": "tab:orange", "marginal_decode": "tab:green"}
    for ax, (case, seed) in zip(axes.flat, points, strict=False):
        over = sd.over_the_bar([r for r in rows if r["case"] == case and r["seed"] == seed])
        for rule, o in over.items():
            x, y = o["ttft_mean_ms"], o["tpot_mean_ms"]
            if x > 3 or y > 1.6:
                continue  # off the scale
            color = family.get(rule.partition(":")[0], "tab:gray")
            filled = o["ttft_p99_ms"] <= 1.0
            ax.scatter(x, y, s=30, edgecolors=color, facecolors=color if filled else "none")
            ax.annotate(rule, (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
        ax.axvline(1.0, color="k", lw=0.8)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xlabel("mean TTFT / gate (1.05x the best baseline)")
        ax.set_ylabel("mean TPOT / gate")
        ax.set_title(f"{case}, seed {seed}", fontsize=9)
    fig.tight_layout()
    fig.savefig(sx.OUT / f"{name}.png", dpi=100)


def at_points(args: argparse.Namespace) -> list[dict]:
    """`--points`: the tuned rules (`--compare`) run at each named point, and every other rule's row
    read back as stored, from the set `sim_tally` reads that point from: no untuned rule runs again."""

    def point(r: dict) -> tuple[str, int, bool]:
        return r["case"], r["seed"], bool(r["rank"].get("mixed_chunk"))

    specs = sd.point_specs(args.points, args.compare)
    want = set(map(point, specs))
    stored = [r for r in stored_points(SETS.split(","), label_mixed=False) if point(r) in want]
    if missing := want - set(map(point, stored)):
        raise SystemExit(f"no stored rows for {sorted(missing)} in {SETS}: run sim_diagnosis there first")
    if any(s["workload"] == "mooncake" for s in specs):
        sx.TRACE = trace_path(args.trace)
    return stored + sd.run_or_reuse(specs, args.reuse, args.workers, "frontier")


def main() -> None:
    ap = sd.parser(__doc__)
    ap.set_defaults(
        cases="agentic_moe,mooncake_7b", seeds=3, rules=",".join([*sd.CANDIDATES, *sd.BASELINES, *TUNED]),
        compare=",".join(TUNED), name="sim_frontier", reuse=SETS,
    )  # fmt: skip
    ap.add_argument("--points", default=None,
                    help="case|seed|mixed (0/1)|efficiency factor, ';'-separated: only the tuned rules "
                         "run, there; the others' rows are read back from sim_tally's sets")  # fmt: skip
    args = ap.parse_args()
    args.reuse = sd.with_own(args.reuse, args.name)
    rows = at_points(args) if args.points else sd.collect(args)
    md = ["## How near any rule gets, tuned ones included", "", *report(rows), ""]
    md += ["## Which rules meet the bar at all (tuned ones included)", "", *sd.reachable(rows), ""]
    md += ["## The tuned rules against the bar", "", *sd.verdict(rows, args.compare.split(",")), ""]
    _plot(rows, args.name)
    write_results(f"sim/{args.name}", __doc__, {"config": vars(args), "rows": rows}, "\n".join(md))


if __name__ == "__main__":
    main()
