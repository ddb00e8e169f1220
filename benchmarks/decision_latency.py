"""Hot-path cost of the current router: decision latency, event ingestion, memory per token.

Starting point for the hot-path work (the Dynamo indexer side-by-side is not here yet). Each rank's
mirror is filled from realistic shared-prefix trees (a few long system prompts, many conversations
branching off them) through the same `apply_events` path the controller uses, then prompts that
share a random part of a conversation are decided. Medians over repeated decisions after warm-up.
Writes JSON, a markdown table and a PNG to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import tracemalloc

from results_io import RESULTS, write_results
from sglang.srt.disaggregation.kv_events import BlockStored
from tqdm import tqdm

from sglang_kvmul.block_hash import first_page_hash
from sglang_kvmul.router import KvmulRouter


def conversation_tree(
    rng: random.Random, systems: list[list[int]], total_tokens: int, page: int, vocab: int = 32000
) -> list[list[int]]:
    """Prompts whose union is about `total_tokens`: conversations branching off shared system
    prompts (the same on every rank, as in one deployment), each turn extending the last."""
    prompts, used = [], 0
    while used < total_tokens:
        base = list(rng.choice(systems))
        for _ in range(rng.randrange(1, 6)):  # turns of one conversation: each extends the last
            base += [rng.randrange(vocab) for _ in range(rng.randrange(500, 4000))]
            prompts.append(base[: len(base) - len(base) % page])
        used += len(base) - 2048
    return prompts


def stored_events(prompts: list[list[int]], page: int) -> list[BlockStored]:
    """BlockStored events as SGLang emits them: new pages only, chained to their parent page."""
    seen: dict[tuple, int] = {}
    events, next_hash = [], 1
    for p in prompts:
        parent, i = None, 0
        while i + page <= len(p) and tuple(p[: i + page]) in seen:
            parent = seen[tuple(p[: i + page])]
            i += page
        hashes, toks = [], []
        while i + page <= len(p):
            h = first_page_hash(p, page) if i == 0 else next_hash
            next_hash += 1
            seen[tuple(p[: i + page])] = h
            hashes.append(h)
            toks += p[i : i + page]
            i += page
        if hashes:
            events.append(
                BlockStored(
                    block_hashes=hashes, parent_block_hash=parent, token_ids=toks, block_size=page, lora_id=None
                )
            )
    return events


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens-per-rank", type=int, default=1_000_000)
    ap.add_argument("--ranks", default="2,16")
    ap.add_argument("--prompts", default="1024,8192,32768")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--name", default="decision_latency")
    args = ap.parse_args()
    ranks = [int(x) for x in args.ranks.split(",")]
    prompt_lens = [int(x) for x in args.prompts.split(",")]
    ps = args.page_size
    rng = random.Random(0)
    rows = []
    for n_ranks in tqdm(ranks, desc="rank counts"):
        router = KvmulRouter(n_ranks, ps)
        systems = [[rng.randrange(32000) for _ in range(2048)] for _ in range(4)]
        trees = [conversation_tree(rng, systems, args.tokens_per_rank, ps) for _ in range(n_ranks)]
        per_rank = [stored_events(prompts, ps) for prompts in trees]
        tokens = sum(len(e.token_ids) for evs in per_rank for e in evs)
        tracemalloc.start()
        t0 = time.perf_counter()
        for r, evs in enumerate(per_rank):
            router.apply_events(r, evs)
        ingest_s = time.perf_counter() - t0
        mem = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        mirrored = sum(m.num_tokens for m in router.mirrors)
        for plen in prompt_lens:
            # half the prompt is a prefix cached on rank 0 (its system prompt is on every rank), the rest is new
            base = max(trees[0], key=len)
            shared = base[: min(len(base), plen // 2)]
            prompt = shared + [rng.randrange(32000) for _ in range(plen - len(shared))]
            hit = router.decide(prompt, limit=len(prompt) - 1).cached[0]
            assert hit >= len(shared) - len(shared) % ps, (hit, len(shared))  # the walk really goes deep
            samples = []
            for i in range(args.repeats + 5):
                t = time.perf_counter()
                router.decide(prompt, limit=len(prompt) - 1)
                if i >= 5:
                    samples.append((time.perf_counter() - t) * 1e6)
            rows.append(
                {
                    "ranks": n_ranks,
                    "prompt_tokens": plen,
                    "decision_median_us": statistics.median(samples),
                    "decision_p90_us": sorted(samples)[int(0.9 * len(samples))],
                    "ingest_tokens_per_s": tokens / ingest_s,
                    "bytes_per_mirrored_token": mem / max(1, mirrored),
                    "mirrored_tokens_per_rank": mirrored / n_ranks,
                }
            )
    report = {"config": vars(args), "rows": rows}
    lines = [
        "| ranks | prompt tokens | decision median (us) | p90 (us) | ingestion (tokens/s) | bytes / mirrored token |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['ranks']} | {r['prompt_tokens']} | {r['decision_median_us']:.0f} | {r['decision_p90_us']:.0f} | "
            f"{r['ingest_tokens_per_s']:.3g} | {r['bytes_per_mirrored_token']:.1f} |"
        )
    write_results(args.name, __doc__, report, "\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for n_ranks in ranks:
        pts = [r for r in rows if r["ranks"] == n_ranks]
        ax.plot(
            [p["prompt_tokens"] for p in pts], [p["decision_median_us"] for p in pts], "o-", label=f"{n_ranks} ranks"
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("median decision latency (us)")
    ax.set_title(f"current router, page size {ps}, ~{args.tokens_per_rank:,} tokens/rank")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / f"{args.name}.png", dpi=110)


if __name__ == "__main__":
    main()
