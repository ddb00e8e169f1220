"""The rule's own part of a decision: `choose` on a prepared view (the index walk excluded), for the
default and the rules it builds on, interleaved in one process so that each term's cost reads as a
ratio measured side by side (this machine is shared and noisy).

Every rank busy and reported: capacities, a measured decode cost, mean batch and output duration,
requests waiting and just prefilled with outputs measured to spread (the default's fresh term runs),
a prefill chunk shorter than the prompt, some ranks' pools short of room for the prompt (about
one in six), and the longest hit a shared stem, so the default's decode, turnover, chunk, room and
stem-gate terms all run.
A fresh view per call, as the router builds one per request. Medians over `--repeats` rounds of
`--calls` decisions, rule order alternating per round.
Results: benchmarks/results/rule_cost.{json,md,png}.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import time

from tqdm import tqdm

from benchmarks.common import RESULTS, pyplot, write_results
from sglang_kvmul.core.rules import DEFAULT_RULE, rule_by_name
from sglang_kvmul.core.view import RankView

RULES = list(
    dict.fromkeys(
        [
            DEFAULT_RULE,
            "marginal_behind_held",
            "marginal_shared",
            "marginal_behind",
            "marginal_room_timed",
            "marginal_room",
            "marginal_chunked",
            "marginal_turnover",
            "marginal_rebalance",
            "marginal_bounded",
            "kvmul",
        ]
    )
)


def busy_view(n: int, prompt: int, rng: random.Random) -> RankView:
    """`n` busy ranks with random caches, queues and batches below their cap; every measured field set.
    The longest hit is a shared stem, so the default's stem gate reads the pools' excess too (and finds
    one short: the room term runs, the costlier of the two decode terms it chooses between)."""
    cached = [rng.randrange(0, prompt) for _ in range(n)]
    return RankView(
        prompt_len=prompt,
        cached=cached,
        stem=max(cached),
        queued=[rng.randrange(0, 200_000) for _ in range(n)],
        running=[rng.randrange(1, 60) for _ in range(n)],
        waiting=[rng.randrange(0, 5) for _ in range(n)],
        fresh=[rng.randrange(0, 5) for _ in range(n)],  # requests just prefilled: the default's fresh term runs
        fresh_pause_weight=4.0,
        kv_tokens=[rng.randrange(0, 2_400_000) for _ in range(n)],  # above 1,967,232: short of room
        page_size=16,
        max_running=[64] * n,
        max_kv_tokens=[2_000_000] * n,
        prefill_us_per_token=[20.0] * n,
        decode_tokens_per_request=300.0,
        decode_batch_mean=30.0,
        decode_output_tokens=150_000.0,
        chunk_tokens=8192,  # below the prompt: the default's chunked slack takes its pass over the ranks
    )


def time_rules(view: RankView, names: list[str], repeats: int, calls: int) -> dict[str, float]:
    """Median us per `choose`, per rule."""
    rules = [rule_by_name(n) for n in names]
    samples: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(repeats):
        order = list(zip(names, rules, strict=True))
        for name, rule in order if rep % 2 else order[::-1]:
            views = [dataclasses.replace(view) for _ in range(calls)]  # uncached per request, as in the router
            t0 = time.perf_counter_ns()
            for v in views:
                rule.choose(v, 0)
            samples[name].append((time.perf_counter_ns() - t0) / calls / 1e3)
    return {n: statistics.median(s) for n, s in samples.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", default="2,16,64,128")
    ap.add_argument("--prompt", type=int, default=32768)
    ap.add_argument("--repeats", type=int, default=60)
    ap.add_argument("--calls", type=int, default=50)
    args = ap.parse_args()
    rng = random.Random(0)
    rows = []
    for n in tqdm([int(x) for x in args.ranks.split(",")], desc="ranks"):
        us = time_rules(busy_view(n, args.prompt, rng), RULES, args.repeats, args.calls)
        rows.append({"ranks": n, "us": us})
    head = "| ranks | " + " | ".join(f"{r} us" for r in RULES) + f" | {RULES[0]} / {RULES[1]} |"
    md = [head, "|---" * (len(RULES) + 2) + "|"]
    for row in rows:
        us = row["us"]
        cells = " | ".join(f"{us[r]:.1f}" for r in RULES)
        md.append(f"| {row['ranks']} | {cells} | {us[RULES[0]] / us[RULES[1]]:.2f} |")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for r in RULES:
        ax.plot([row["ranks"] for row in rows], [row["us"][r] for row in rows], marker="o", label=r)
    ax.set_xlabel("DP ranks")
    ax.set_ylabel("us per decision (rule only)")
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "rule_cost.png", dpi=100)
    write_results("rule_cost", __doc__, {"config": vars(args), "rules": RULES, "rows": rows}, "\n".join(md))


if __name__ == "__main__":
    main()
