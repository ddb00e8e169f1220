"""Issue 14's bar over every simulated point at once: the result sets of `sim_diagnosis` (its cases,
the other workload seeds, mixed chunks, the roofline's efficiency factors halved and doubled) read
back, each (case, seed, scheduling mode) counted once, and per rule: the points within the bar, the
geometric mean and worst of each ratio to the best baseline, and the points no rule meets. No
simulation runs here; the figures are those of the result files named (`--sets`).
Results: benchmarks/results/sim/sim_tally.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from benchmarks import sim_diagnosis as sd
from benchmarks import sim_experiments as sx
from benchmarks.common import pyplot, write_results

SETS = ",".join([
    "sim_diagnosis", "sim_diagnosis_seeds", "sim_diagnosis_seeds_more", "sim_diagnosis_mixed",
    "sim_diagnosis_mixed_seeds", "sim_diagnosis_costs",
])  # fmt: skip


def points(names: list[str]) -> dict[tuple[str, int], list[dict]]:
    """(case, seed) -> its rows, from the named result sets; a point already read (the same case and
    seed in an earlier set: the seed-0 rows the seed sets repeat) is not read again. Mixed-chunk cases
    are their own points."""
    out: dict[tuple[str, int], list[dict]] = {}
    for name in names:
        doc = json.loads((sx.OUT / f"{name}.json").read_text())
        for r in doc["rows"]:
            case = r["case"] + (" (mixed chunks)" if r["rank"].get("mixed_chunk") else "")
            key = (case, r["seed"])
            if key not in out or out[key][0].get("_set") == name:
                out.setdefault(key, []).append({**r, "_set": name})
    return out


def tally(pts: dict[tuple[str, int], list[dict]], rules: list[str]) -> tuple[list[dict], list[str]]:
    """Per rule its count within the bar and its ratios' geo-mean and worst; and the points where no
    rule that ran meets the bar."""
    per_rule = []
    for rule in rules:
        ratios = [f[1] for sub in pts.values() if (f := sd._against_best(sub, rule)) is not None]
        if not ratios:
            continue
        met = sum(all(r[m] <= g for m, g in sd.GATES.items()) for r in ratios)
        per_rule.append({
            "rule": rule, "met": met, "points": len(ratios),
            **{f"{m}_geo": float(np.exp(np.mean(np.log([r[m] for r in ratios])))) for m in sd.GATES},
            **{f"{m}_worst": max(r[m] for r in ratios) for m in sd.GATES},
        })  # fmt: skip
    nobody = [
        f"{case}, seed {seed}"
        for (case, seed), sub in sorted(pts.items())
        if not any(
            (f := sd._against_best(sub, r["rule"])) and all(f[1][m] <= g for m, g in sd.GATES.items()) for r in sub
        )
    ]
    return per_rule, nobody


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default=SETS, help="result sets under benchmarks/results/sim/")
    ap.add_argument("--rules", default=",".join(sd.CANDIDATES), help="the rules counted")
    ap.add_argument("--name", default="sim_tally")
    args = ap.parse_args()
    pts = points(args.sets.split(","))
    per_rule, nobody = tally(pts, args.rules.split(","))
    md = [f"{len(pts)} simulated points; within the bar (mean TTFT <= 1.05x, mean TPOT <= 1.05x, P99 TTFT <= 1.1x "
          "of the best baseline's), and each ratio's geometric mean / worst:", "",
          "| rule | points within the bar | " + " | ".join(f"{m} geo / worst" for m in sd.GATES) + " |",
          "|---" * (len(sd.GATES) + 2) + "|"]  # fmt: skip
    for t in per_rule:
        cells = [f"{t[f'{m}_geo']:.2f} / {t[f'{m}_worst']:.2f}" for m in sd.GATES]
        md.append(f"| {t['rule']} | {t['met']} of {t['points']} | " + " | ".join(cells) + " |")
    md += ["", f"No rule that ran meets the bar on {len(nobody)} of the {len(pts)} points:", ""]
    md += [f"- {p}" for p in nobody]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    bars = ax.bar([t["rule"] for t in per_rule], [t["met"] for t in per_rule])
    ax.bar_label(bars, [f"{t['met']} of {t['points']} run" for t in per_rule], fontsize=8)
    ax.axhline(len(pts) - len(nobody), color="k", ls="--", label="points some rule meets")
    ax.set_ylabel(f"points within the bar (of {len(pts)})")
    ax.tick_params(axis="x", rotation=30)
    ax.legend()
    fig.tight_layout()
    fig.savefig(sx.OUT / f"{args.name}.png", dpi=100)
    report = {"config": vars(args), "rules": per_rule, "nobody": nobody}
    write_results(f"sim/{args.name}", __doc__, report, "\n".join(md))


if __name__ == "__main__":
    main()
