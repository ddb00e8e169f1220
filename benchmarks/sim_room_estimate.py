"""How good `marginal_room`'s KV-room estimate is: each decision's estimate for the rank chosen, set
against the wait that request then had there (simulated, 16 ranks).

The estimate (`core.rules.kv_room_wait`, before the exemption) says how long a request joining a
rank that is short of KV room will wait for pages, counting the whole queue's wait behind a head
that has no room (L x excess / held, less the queue ahead; in prefill tokens, converted to seconds at
the pooled measured prefill speed the router held then). The wait that happened is the simulator's
`kv_blocked`: the time the request spent in its rank's queue while the queue head (itself included)
waited for pages. The decisions are split by what the rule does with them: a rank where the request
held a prefill chunk or more of its prompt (`marginal_room` does not price the wait there), one
where it held less (priced), and decisions where no rank had room (no rule prices it then). A rank
with room has no estimate; what its requests waited anyway is the last group (the pools fill after
routing). The table also gives the wait with the queue ahead not taken off (the whole L x excess /
held): SGLang admits in queue order, so the queue ahead does not drain while its head waits for
pages, and that is what a model of a blocked queue says (tried as the rule's: it routed worse,
README "The default rule").

Run under the rule that routes (`--rules`): under `marginal_room` the decisions that chose a short
rank were picked by the estimate itself; under `marginal_chunked` they were not (the estimate is
only observed), which is the fairer test of it. Writes `results/sim/sim_room_estimate.{json,md,png}`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from multiprocessing import Pool

import numpy as np
from tqdm import tqdm

from benchmarks import sim_diagnosis as sd
from benchmarks import sim_experiments as sx
from benchmarks.common import panel_grid, trace_path, write_results
from sglang_kvmul.core.decode_cost import PooledDecodeCost
from sglang_kvmul.core.rules import Choice, RankView, Rule, kv_room_wait, rule_by_name
from sglang_kvmul.sim.engine import SimConfig, Simulation
from sglang_kvmul.sim.rank import RankConfig

GROUPS = {  # how the rule treats the decision, by the rank chosen
    "exempt": "short rank, request holds >= a chunk (not priced)",
    "priced": "short rank, request holds < a chunk (priced)",
    "all_short": "no rank had room (no rule prices it)",
    "room": "rank had room (no estimate)",
}


PCTS = (("p50", 50), ("p90", 90))


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (many waits are exactly 0)."""
    r = np.empty(len(x))
    r[x.argsort(kind="stable")] = np.arange(len(x))
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(inv, weights=r) / counts)[inv]


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Rank correlation (None: too few decisions, or one side constant)."""
    if len(a) < 3 or a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


@dataclass(slots=True)
class _Seen:
    group: str
    estimate_s: float  # 0.0 for a rank with room
    whole_s: float  # the same without the queue ahead taken off (the queue does not drain while its head waits)


class _Observer:
    """The routing rule unchanged, noting the estimate for the rank it chose. It asks the router for the
    capacity figures whatever the rule reads; a rule that does not read them decides as before."""

    reads_capacity = True

    def __init__(self, rule: Rule, speed: PooledDecodeCost) -> None:
        self.rule, self.name, self.speed = rule, rule.name, speed
        self.seen: list[_Seen | None] = []  # None: not measured yet (no output length, no speed)

    def choose(self, view: RankView, rotation: int) -> Choice:
        c = self.rule.choose(view, rotation)
        us = self.speed.prefill_us_per_token
        horizon, caps = view.decode_output_tokens, view.max_kv_tokens
        if not (horizon and caps and us):
            self.seen.append(None)
            return c
        r = c.rank
        waits = [
            kv_room_wait(horizon, x, kv, cap, q)
            for x, kv, cap, q in zip(view.kv_excess, view.kv_tokens, caps, view.queued, strict=True)
        ]
        w = waits[r]
        if w is None:
            group = "room"
        elif all(x is not None for x in waits):
            group = "all_short"
        else:
            group = "exempt" if view.chunk_tokens and view.cached[r] >= view.chunk_tokens else "priced"
        whole = kv_room_wait(horizon, view.kv_excess[r], view.kv_tokens[r], caps[r], 0) or 0.0
        self.seen.append(_Seen(group, (w or 0.0) * us * 1e-6, whole * us * 1e-6))
        return c


def run(spec: dict) -> dict:
    """One simulation under an observed rule -> per-group estimate and actual wait (pool worker)."""
    work = sx._workload(spec["workload"], json.dumps(spec["params"], sort_keys=True))
    cfg = SimConfig(ranks=spec["ranks"], rank=RankConfig(**spec["rank"]), rule=spec["rule"])
    sim = Simulation(cfg, sx.scaled_cost(spec["profile"], spec.get("scale")), speeds=spec.get("speeds"))
    obs = _Observer(rule_by_name(spec["rule"]), sim.router.decode_cost)
    sim.router.rule = obs
    t0 = time.perf_counter()
    reqs = sim.run(work)
    routed = sorted(reqs, key=lambda q: q.arrival)  # the order the engine routes in (a stable sort, as its own)
    if len(routed) != len(obs.seen):
        raise RuntimeError(f"{len(obs.seen)} decisions for {len(routed)} requests")
    groups: dict[str, dict] = {}
    for g in GROUPS:
        pairs = [
            (s.estimate_s, q.kv_blocked, s.whole_s) for s, q in zip(obs.seen, routed, strict=True) if s and s.group == g
        ]
        est, act, whole = (np.array([p[i] for p in pairs], dtype=float) for i in (0, 1, 2))
        some = len(pairs) > 0
        pick = np.arange(0, len(pairs), max(1, len(pairs) // 400))  # the plot's sample
        groups[g] = {
            "n": len(pairs),
            **{f"est_{k}_s": float(np.percentile(est, p)) if some else None for k, p in PCTS},
            **{f"act_{k}_s": float(np.percentile(act, p)) if some else None for k, p in PCTS},
            "est_mean_s": float(est.mean()) if some else None,
            "act_mean_s": float(act.mean()) if some else None,
            "whole_mean_s": float(whole.mean()) if some else None,
            "whole_rank_corr": spearman(whole, act),
            "waited_share": float((act > 0).mean()) if some else None,
            "rank_corr": spearman(est, act),
            "sample": np.stack([est[pick], act[pick]], axis=1).tolist(),
        }
    return {
        **{k: v for k, v in spec.items() if k != "params"},
        "unmeasured": sum(s is None for s in obs.seen),
        "groups": groups,
        "sim_wall_s": time.perf_counter() - t0,
    }


def _cell(v: float | None, fmt: str = "{:.2f}") -> str:
    return "" if v is None else fmt.format(v)


def table(rows: list[dict]) -> list[str]:
    out = [
        "| case | rule | decisions | estimate mean s | waited mean s | estimate P50 / P90 s | waited P50 / P90 s "
        "| share that waited | rank corr | whole wait (queue not taken off) mean s | its rank corr |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["case"], r["rule"])):
        for g, label in GROUPS.items():
            s = r["groups"][g]
            if not s["n"]:
                continue
            cells = [f"{label}: {s['n']}", _cell(s["est_mean_s"]), _cell(s["act_mean_s"])]
            cells += [f"{_cell(s[f'{k}_p50_s'])} / {_cell(s[f'{k}_p90_s'])}" for k in ("est", "act")]
            cells += [_cell(s["waited_share"]), _cell(s["rank_corr"]), _cell(s["whole_mean_s"])]
            cells.append(_cell(s["whole_rank_corr"]))
            out.append(f"| {r['case']} | {r['rule']} | " + " | ".join(cells) + " |")
    return out


def plot(rows: list[dict], name: str) -> None:
    """Estimate against the wait that happened, per decision (a sample), one panel per run."""
    rows = sorted(rows, key=lambda r: (r["case"], r["rule"]))
    fig, axes = panel_grid(len(rows), 4, 4.5, 4.2)
    for ax, r in zip(axes, rows, strict=True):
        top = 1e-3
        for g in ("exempt", "priced", "all_short"):
            pts = np.array(r["groups"][g]["sample"]).reshape(-1, 2)
            if len(pts):
                ax.scatter(np.maximum(pts[:, 0], 1e-3), np.maximum(pts[:, 1], 1e-3), s=6, alpha=0.5, label=g)
                top = max(top, pts.max())
        ax.plot([1e-3, top], [1e-3, top], "k--", lw=0.8, label="estimate = waited")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("estimated KV wait (s)")
        ax.set_ylabel("waited behind a full pool (s; 1 ms floor)")
        ax.set_title(f"{r['case']}, {r['rule']}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(sx.OUT / f"{name}.png", dpi=100)


def main() -> None:
    ap = sd.parser(__doc__)
    ap.set_defaults(
        cases="stress_kv_pressure,mooncake_moe",
        rules="marginal_chunked,marginal_room",
        cost_scales="1,2",
        name="sim_room_estimate",
    )
    args = ap.parse_args()
    if any(sd.CASES[c]["workload"] == "mooncake" for c in args.cases.split(",")):
        sx.TRACE = trace_path(args.trace)
    specs = sd._specs(args)
    rows = []
    with Pool(args.workers, maxtasksperchild=2) as pool:
        for row in tqdm(pool.imap_unordered(run, specs), total=len(specs), desc="room estimate"):
            rows.append(row)
            tqdm.write(f"{row['case']} {row['rule']}: { ({g: s['n'] for g, s in row['groups'].items()}) }")
    md = table(rows)
    plot(rows, args.name)
    write_results(f"sim/{args.name}", __doc__, {"config": vars(args), "rows": rows}, "\n".join(md))


if __name__ == "__main__":
    main()
