"""Under overload, who waits: the requests with a long fresh prefill against the rest, per rule. By
default on the points where `marginal_shared`'s mean TTFT missed issue 14's bar by the most (the 12x
Mooncake sweep, `sim_diagnosis`'s `sweep_12x`, three seeds); `--cases`, `--seeds` and `--cost-scales`
pick others (the best baseline is read from the stored sets, so the point must be in them).

A request is "long" when the part of its prompt no rank held when it was routed is more than four
prefill chunks (SGLang's chunked_prefill_size): a prefill that holds its rank for several steps
whatever the rule does. This is a reporting split, not a rule input. Per run: mean and P99 TTFT of
the long requests and of the rest, their time waiting behind a queue head that had no KV room, the
long requests' share of the fresh prefill work, and the run's mean / P99 TTFT and TPOT against the
best baseline's (the linear sweep, Dynamo's rule). The mean TTFT is mostly the rest's (the long
ones are ~5% of the requests); P99 can be either class's (the long ones are more than 1%). A rule
that sends long prompts to the shortest queue puts them ahead of many short requests (the rest
wait); one that sends them where few requests wait keeps them behind other long ones (they wait).

The simulator is deterministic; these are `sim_diagnosis`'s runs, re-run to count what its rows do
not keep. Cost factors: the H100 + Qwen2.5-7B roofline, efficiency factors assumed (x1 unless `--cost-scales`).
Results: benchmarks/results/sim/sim_overload.{json,md,png}.
"""

from __future__ import annotations

import numpy as np

from benchmarks import sim_diagnosis as sd
from benchmarks import sim_experiments as sx
from benchmarks import sim_tally as st
from benchmarks.common import panel_grid, write_results
from benchmarks.sim_cold_tail import _at
from sglang_kvmul.sim.rank import RankConfig

# the default, the default before it and the rule it refines, the two slacks before those, and the alpha
# that meets the most of these points
RULES = list(
    dict.fromkeys(
        [sd.CANDIDATES[0], "marginal_shared", "marginal_behind", "marginal_chunked", "marginal_turnover", "linear:0.5"]
    )
)
LONG_CHUNKS = 4  # a fresh prefill of more than this many chunks counts as long


def census(spec: dict) -> dict:
    """One run's summary row plus the long requests against the rest (a pool worker)."""
    sim, reqs, wall = sx.simulate(spec)
    chunk = spec["rank"].get("chunk_tokens", RankConfig.chunk_tokens)
    return {**sx.summarize(spec, sim, reqs, wall), **size_classes(reqs, chunk)}


def size_classes(reqs: list, chunk: int) -> dict:
    """TTFT and time behind a KV-blocked head, for the requests whose fresh prefill (prompt less the
    most any rank held at routing) is over `LONG_CHUNKS` chunks and for the rest; how many long ones
    there are and their share of the fresh prefill tokens."""
    ttft = np.array([r.first_token - r.arrival for r in reqs]) * 1e3
    behind = np.array([r.kv_blocked - r.kv_wait for r in reqs]) * 1e3
    fresh = np.array([len(r.tokens) - r.best_cached for r in reqs])
    long = fresh > LONG_CHUNKS * chunk
    out: dict = {"long_requests": int(long.sum()), "long_fresh_share": float(fresh[long].sum() / max(1, fresh.sum()))}
    for tag, m in (("long", long), ("rest", ~long)):
        out[f"{tag}_ttft_mean_ms"] = float(ttft[m].mean()) if m.any() else None
        out[f"{tag}_ttft_p99_ms"] = float(np.percentile(ttft[m], 99)) if m.any() else None
        out[f"{tag}_behind_kv_ms"] = float(behind[m].mean()) if m.any() else None
    return out


def main() -> None:
    ap = sd.parser(__doc__)
    ap.set_defaults(cases="sweep_12x", rules=",".join(RULES), seeds=3, name="sim_overload")
    args = ap.parse_args()
    rows = sd.run_or_reuse(sd._specs(args), args.reuse, args.workers, "overload", census)
    points = sorted({(r["case"], r["seed"]) for r in rows})
    stored = st.points(st.SETS.split(","))
    md = [
        "| point | rule | mean TTFT ms (/ best baseline) | P99 TTFT ms (/ best) | TPOT ms (/ best) "
        "| long requests (share of fresh prefill) | long: mean / P99 TTFT ms | rest: mean / P99 TTFT ms "
        "| behind a KV-blocked head, long / rest ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case, seed in points:
        sub = sorted(_at(rows, case, seed), key=lambda r: r["ttft_mean_ms"])
        base = [r for r in _at(stored, case, seed) if r["rule"] in sd.BASELINES]
        best = {k: min(r[k] for r in base) for k in sd.GATES}
        for r in sub:
            ratio = {k: r[k] / best[k] for k in sd.GATES}
            md.append(
                f"| {case}, seed {seed} | {r['rule']} | {r['ttft_mean_ms']:.0f} ({ratio['ttft_mean_ms']:.2f}) "
                f"| {r['ttft_p99_ms']:.0f} ({ratio['ttft_p99_ms']:.2f}) | {r['tpot_mean_ms']:.1f} "
                f"({ratio['tpot_mean_ms']:.2f}) | {r['long_requests']} ({r['long_fresh_share']:.2f}) "
                f"| {_ms(r['long_ttft_mean_ms'])} / {_ms(r['long_ttft_p99_ms'])} "
                f"| {_ms(r['rest_ttft_mean_ms'])} / {_ms(r['rest_ttft_p99_ms'])} "
                f"| {_ms(r['long_behind_kv_ms'])} / {_ms(r['rest_behind_kv_ms'])} |"
            )
    _plot(rows, points, args.name)
    write_results(f"sim/{args.name}", __doc__, {"config": vars(args), "rows": rows}, "\n".join(md))


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0f}"


def _plot(rows: list[dict], points: list[tuple[str, int]], name: str) -> None:
    """Per point: the long requests' mean TTFT against the rest's, one dot per rule."""
    fig, axes = panel_grid(len(points), 3, 4.5, 3.6)
    for ax, (case, seed) in zip(axes, points, strict=True):
        for r in _at(rows, case, seed):
            ax.scatter(r["rest_ttft_mean_ms"], r["long_ttft_mean_ms"], **sx._style(r["rule"]))
            ax.annotate(r["rule"], (r["rest_ttft_mean_ms"], r["long_ttft_mean_ms"]), fontsize=6)
        ax.set_title(f"{case}, seed {seed}", fontsize=8)
        ax.set_xlabel("the rest: mean TTFT ms", fontsize=7)
        ax.set_ylabel(f"fresh prefill > {LONG_CHUNKS} chunks: mean TTFT ms", fontsize=7)
    fig.tight_layout()
    fig.savefig(sx.OUT / f"{name}.png", dpi=110)


if __name__ == "__main__":
    main()
