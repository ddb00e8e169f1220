"""When the slowest 1% are cold prefills: a census of the requests that found nothing of their prompt
cached on the rank they went to, per rule, for the points whose P99 TTFT the default misses by that
(issue 14: half the ranks at half speed, `sim_diagnosis`'s `stress_heterogeneous`).

Per run: P99 TTFT against the best baseline's (the linear sweep, Dynamo's rule), mean TTFT and TPOT;
the cold requests, split into compulsory (no rank held any of the prompt when it was routed: a
system prompt's first use) and copies (another rank held it: the rule sent the request elsewhere),
and how many ran on the slower ranks; the slowest 1% (the requests at or above P99) and how many of
them were cold. Where the cold requests are about 1% of all or more, they set P99 (a cold prefill,
most of all on a slower rank, takes several times a warm request's TTFT); where they are fewer, the
slowest warm requests do. The simulator is deterministic:
these are the runs `sim_diagnosis` stores, re-run to count what its rows do not keep. Cost factors:
the H100 + Qwen2.5-7B roofline, whose efficiency factors are assumed (x0.5, x1, x2 here); the rank
speeds (half the ranks at 0.5) are the case's.
Results: benchmarks/results/sim/sim_cold_tail.{json,md,png}.
"""

from __future__ import annotations

import numpy as np

from benchmarks import sim_diagnosis as sd
from benchmarks import sim_experiments as sx
from benchmarks.common import panel_grid, write_results

RULES = [sd.CANDIDATES[0], "marginal_room_timed", "kvmul", *sd.BASELINES]


def census(spec: dict) -> dict:
    """One run's summary row plus its cold requests and what its slowest 1% is made of (a pool worker)."""
    sim, reqs, wall = sx.simulate(spec)
    return {**sx.summarize(spec, sim, reqs, wall), **cold_counts(reqs, spec.get("speeds"))}


def cold_counts(reqs: list, speeds: list[float] | None) -> dict:
    """The requests with nothing cached on their rank (copies: some rank held part of the prompt when
    it was routed), those on a rank slower than the fastest, and the slowest 1% (at or above P99)."""
    ttft = np.array([r.first_token - r.arrival for r in reqs]) * 1e3
    cold = np.array([r.cached == 0 for r in reqs])
    copy = cold & np.array([r.best_cached > 0 for r in reqs])
    slow = np.array([speeds[r.rank] < max(speeds) for r in reqs]) if speeds else np.zeros(len(reqs), bool)
    tail = ttft >= np.percentile(ttft, 99)
    return {
        "cold": int(cold.sum()),
        "cold_copies": int(copy.sum()),
        "cold_on_slower": int((cold & slow).sum()),
        "tail_requests": int(tail.sum()),
        "tail_cold": int((tail & cold).sum()),
        "cold_ttft_p50_ms": float(np.median(ttft[cold])) if cold.any() else None,
        "warm_ttft_p99_ms": float(np.percentile(ttft[~cold], 99)) if (~cold).any() else None,
    }


def main() -> None:
    ap = sd.parser(__doc__)
    ap.set_defaults(cases="stress_heterogeneous", rules=",".join(RULES), seeds=3, cost_scales="0.5,1,2",
                    name="sim_cold_tail")  # fmt: skip
    args = ap.parse_args()
    rows = sd.run_or_reuse(sd._specs(args), args.reuse, args.workers, "cold tail", census)
    points = sorted({(r["case"], r["seed"]) for r in rows})
    md = ["Per point, the default against the baseline with the lowest P99:", "", *_verdicts(rows, points), ""]
    md += [
        "| point | rule | P99 TTFT ms (/ best baseline) | mean TTFT ms | TPOT ms "
        "| cold requests (copies, on slower ranks) | slowest 1% (cold) | cold TTFT p50 ms | P99 of the warm ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case, seed in points:
        sub = sorted(_at(rows, case, seed), key=lambda r: r["ttft_p99_ms"])
        best = _best(sub)["ttft_p99_ms"]
        for r in sub:
            md.append(
                f"| {case}, seed {seed} | {r['rule']} | {r['ttft_p99_ms']:.1f} ({r['ttft_p99_ms'] / best:.2f}) "
                f"| {r['ttft_mean_ms']:.2f} | {r['tpot_mean_ms']:.2f} | {r['cold']} ({r['cold_copies']}, "
                f"{r['cold_on_slower']}) | {r['tail_requests']} ({r['tail_cold']}) | {_ms(r['cold_ttft_p50_ms'])} "
                f"| {_ms(r['warm_ttft_p99_ms'])} |"
            )
    _plot(rows, points, args.name)
    write_results(f"sim/{args.name}", __doc__, {"config": vars(args), "rows": rows}, "\n".join(md))


def _at(rows: list[dict], case: str, seed: int) -> list[dict]:
    return [r for r in rows if r["case"] == case and r["seed"] == seed]


def _best(sub: list[dict]) -> dict:
    """The baseline with the lowest P99 TTFT."""
    return min((r for r in sub if r["rule"] in sd.BASELINES), key=lambda r: r["ttft_p99_ms"])


def _verdicts(rows: list[dict], points: list[tuple[str, int]]) -> list[str]:
    """Per point: the default's P99 over the best baseline's, its cold requests against the slowest 1%,
    and its warm requests' P99 against that baseline's (what its P99 would be without the cold class)."""
    out = []
    for case, seed in points:
        sub = _at(rows, case, seed)
        best, ours = _best(sub), next((r for r in sub if r["rule"] == RULES[0]), None)
        if ours is None:
            continue
        out.append(
            f"- {case}, seed {seed}: `{RULES[0]}` P99 {ours['ttft_p99_ms']:.1f} ms, "
            f"{ours['ttft_p99_ms'] / best['ttft_p99_ms']:.2f}x `{best['rule']}`'s; cold requests "
            f"{ours['cold']} ({ours['cold_copies']} copies) against {best['cold']} ({best['cold_copies']}), "
            f"slowest 1% {ours['tail_requests']}; the warm requests' P99 {_ms(ours['warm_ttft_p99_ms'])} "
            f"against {_ms(best['warm_ttft_p99_ms'])} ms; a cold request's median TTFT "
            f"{_ms(ours['cold_ttft_p50_ms'])} ms"
        )
    return out


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def _plot(rows: list[dict], points: list[tuple[str, int]], name: str) -> None:
    """Per point: P99 TTFT against cold requests, one dot per rule, the 1% line dashed."""
    fig, axes = panel_grid(len(points), 3, 4.5, 3.6)
    for ax, (case, seed) in zip(axes, points, strict=True):
        sub = _at(rows, case, seed)
        for r in sub:
            ax.scatter(r["cold"], r["ttft_p99_ms"], **sx._style(r["rule"]))
            ax.annotate(r["rule"], (r["cold"], r["ttft_p99_ms"]), fontsize=6)
        ax.axvline(sub[0]["tail_requests"], ls="--", c="grey", lw=0.8)
        ax.set_title(f"{case}, seed {seed}", fontsize=8)
        ax.set_xlabel("cold requests (dashed: 1% of all)", fontsize=7)
        ax.set_ylabel("P99 TTFT ms", fontsize=7)
    fig.tight_layout()
    fig.savefig(sx.OUT / f"{name}.png", dpi=110)


if __name__ == "__main__":
    main()
