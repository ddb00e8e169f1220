"""Issue 14's bar over every simulated point at once: the result sets of `sim_diagnosis` (its cases,
the other workload seeds, mixed chunks, the roofline's efficiency factors halved and doubled) read
back, each (case, seed, scheduling mode) counted once, and per rule: the points within the bar, the
geometric mean and worst of each ratio to the best baseline, the points no rule meets, and where the
default misses a point some other rule meets, what that rule gives up against the default. No
simulation runs here; the figures are those of the result files named (`--sets`). With
`sim_frontier`'s sets named first (`sim_tally_tuned.md`), the points no rule meets count its tuned
rules too.
Results: benchmarks/results/sim/sim_tally.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json

from benchmarks import sim_diagnosis as sd
from benchmarks import sim_experiments as sx
from benchmarks.common import pyplot, write_results

# the first set holding a point is the one read for it: sim_diagnosis_seeds_12x (every candidate on the 12x
# sweep's seeds) before sim_diagnosis_seeds_rest (the default, the last one and the product on six cases' seeds)
SETS = ",".join([
    "sim_diagnosis", "sim_diagnosis_seeds", "sim_diagnosis_seeds_more", "sim_diagnosis_seeds_12x",
    "sim_diagnosis_seeds_rest", "sim_diagnosis_seeds_moe", "sim_diagnosis_mixed", "sim_diagnosis_mixed_seeds",
    "sim_diagnosis_costs", "sim_diagnosis_costs_x2", "sim_diagnosis_seeds_x2", "sim_diagnosis_costs_x05",
    "sim_cold_tail",
])  # fmt: skip


def points(names: list[str], label_mixed: bool = True) -> list[dict]:
    """The rows of the named result sets, each (case, seed) taken from the first set that has it (the
    seed sets repeat seed 0's rows); a mixed-chunk case is its own case, named so (`label_mixed`; else
    the rows as stored, for a set that stores them again)."""
    rows: list[dict] = []
    claimed: dict[tuple[str, int], str] = {}
    for name in names:
        doc = json.loads((sx.OUT / f"{name}.json").read_text())
        for r in doc["rows"]:
            case = r["case"] + (" (mixed chunks)" if r["rank"].get("mixed_chunk") else "")
            if claimed.setdefault((case, r["seed"]), name) == name:
                rows.append({**r, "case": case} if label_mixed else r)
    return rows


def nobody_meets(rows: list[dict]) -> list[tuple[str, int]]:
    """The points (case, seed) where no rule that ran meets the bar."""
    return [
        (case, seed)
        for case, seed in sorted({(r["case"], r["seed"]) for r in rows})
        if not any(
            max(o.values()) <= 1.0
            for o in sd.over_the_bar([r for r in rows if r["case"] == case and r["seed"] == seed]).values()
        )
    ]


def trades(rows: list[dict], default: str, rules: list[str]) -> tuple[list[dict], list[dict]]:
    """The points `default` misses and other rules (the baselines among them) meet, each with the
    default's ratios over the gates and those rules; and per other rule, over the points both ran, how
    many it meets that the default misses and how many the default meets that it misses. That some
    rule beats the default on a point says little alone; what switching would cost elsewhere is the
    other half."""
    over: dict[tuple[str, int], dict[str, dict[str, float]]] = {}
    for case, seed in sorted({(r["case"], r["seed"]) for r in rows}):
        over[case, seed] = sd.over_the_bar([r for r in rows if r["case"] == case and r["seed"] == seed])
    ok = {p: {rule: max(o.values()) <= 1.0 for rule, o in o_p.items()} for p, o_p in over.items()}
    missed = []
    for p, o_p in over.items():
        if default in o_p and not ok[p][default]:
            meeting = [rule for rule in rules if rule != default and ok[p].get(rule)]
            if meeting:
                missed.append({"case": p[0], "seed": p[1], "default": o_p[default], "met_by": meeting})
    per_rule = []
    for rule in rules:
        both = [p for p in over if rule != default and rule in ok[p] and default in ok[p]]
        if both:
            gains = sum(ok[p][rule] and not ok[p][default] for p in both)
            losses = sum(ok[p][default] and not ok[p][rule] for p in both)
            per_rule.append({"rule": rule, "points": len(both), "gains": gains, "losses": losses})
    return missed, per_rule


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default=SETS, help="result sets under benchmarks/results/sim/")
    ap.add_argument("--rules", default=",".join(sd.CANDIDATES), help="the rules counted")
    ap.add_argument("--name", default="sim_tally")
    args = ap.parse_args()
    rows = points(args.sets.split(","))
    per_rule = [st for rule in args.rules.split(",") if (st := sd.rule_stats(rows, rule))]
    nobody = nobody_meets(rows)
    n = len({(r["case"], r["seed"]) for r in rows})
    md = [f"{n} simulated points; within the bar (mean TTFT <= 1.05x, mean TPOT <= 1.05x, P99 TTFT <= 1.1x "
          "of the best baseline's), and each ratio's geometric mean / worst:", "",
          *sd.summary(rows, [t["rule"] for t in per_rule])]  # fmt: skip
    near = {p: sd.nearest([r for r in rows if (r["case"], r["seed"]) == p]) for p in nobody}
    md += ["", f"No rule that ran meets the bar on {len(nobody)} of the {n} points. How near any rule gets on "
           "each metric while within the other two gates (ratio over its gate, and the rule; none: no rule "
           "is within the other two):", "",
           "| point | " + " | ".join(f"{m} / gate" for m in sd.GATES) + " |",
           "|---" * (len(sd.GATES) + 1) + "|"]  # fmt: skip
    md += [f"| {c}, seed {s} | " + " | ".join(f"{v[0]:.3f} ({v[1]})" if v else "none" for v in near[c, s].values())
           + " |" for c, s in nobody]  # fmt: skip
    default = per_rule[0]["rule"] if per_rule else ""
    missed, swaps = trades(rows, default, [*(t["rule"] for t in per_rule), *sd.BASELINES])
    md += ["", f"Points `{default}` misses and another rule meets ({len(missed)}), with its mean TTFT / TPOT / "
           "P99 TTFT over the gates (1.0: at the bar):", "",
           "| point | over the gates | met by |", "|---|---|---|"]  # fmt: skip
    md += [f"| {m['case']}, seed {m['seed']} | " + " / ".join(f"{v:.2f}" for v in m["default"].values())
           + f" | {', '.join(m['met_by'])} |" for m in missed]  # fmt: skip
    md += ["", f"Each other rule against `{default}` over the points both ran: the points it meets and "
           "the default misses, and those the default meets and it misses:", "",
           "| rule | points both ran | it gains | it loses |", "|---|---|---|---|"]  # fmt: skip
    md += [f"| {t['rule']} | {t['points']} | {t['gains']} | {t['losses']} |" for t in swaps]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    bars = ax.bar([t["rule"] for t in per_rule], [t["met"] for t in per_rule])
    ax.bar_label(bars, [f"{t['met']} of {t['points']} run" for t in per_rule], fontsize=8)
    ax.axhline(n - len(nobody), color="k", ls="--", label="points some rule meets")
    ax.set_ylabel(f"points within the bar (of {n})")
    ax.tick_params(axis="x", rotation=30)
    ax.legend()
    fig.tight_layout()
    fig.savefig(sx.OUT / f"{args.name}.png", dpi=100)
    nobody_rows = [{"case": c, "seed": s, "nearest": near[c, s]} for c, s in nobody]
    report = {"config": vars(args), "rules": per_rule, "nobody": nobody_rows, "missed": missed, "swaps": swaps}
    write_results(f"sim/{args.name}", __doc__, report, "\n".join(md))


if __name__ == "__main__":
    main()
