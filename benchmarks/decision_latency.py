"""Hot path at production scale: decision latency, event ingestion, memory; Dynamo's indexer alongside.

Each rank's cache holds ~`--tokens-per-rank` tokens built from realistic shared-prefix trees: the
same few system prompts on every rank (one deployment), conversations branching off them (each
turn extends the last), and one long agent session per rank that reaches the longest prompt. Page
hashes are content-chained (as SGLang's), so equal content has equal hashes on every rank.
Measured, one process, medians after warm-up:
  * decision: `KvmulRouter.decide` (first-page hash, one shared-index walk for all ranks, in-flight
    credit, the rule's score and argmin; `--rule`, default the serving default; every rank busy with
    its capacity reported) for prompts whose first half is cached on rank 0;
  * match only: the shared index walk alone;
  * Dynamo: `RadixTree.find_matches` of PyPI `ai-dynamo-runtime` on the same stored events, timed
    with its block hashing of the prompt (`compute_block_hash_for_seq`), which it needs;
  * ingestion: stored tokens/s (every rank's full build) and removed tokens/s (10% of the
    conversation leaves removed), through the controller's own `apply_events`; Dynamo gets the same
    events as pre-encoded JSON bytes;
  * memory: bytes per mirrored token (tracemalloc over the build; Dynamo's is Rust-side: RSS delta).
Writes JSON, a markdown table and a PNG to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import statistics
import time
import tracemalloc
from collections.abc import Callable

import numpy as np
from tqdm import tqdm

from benchmarks.common import RESULTS, pyplot, write_results
from sglang_kvmul.core.block_hash import first_page_hash
from sglang_kvmul.core.events import BlockRemoved, BlockStored
from sglang_kvmul.core.load_ledger import LoadSnapshotView
from sglang_kvmul.core.router import KvmulRouter
from sglang_kvmul.core.rules import DEFAULT_RULE, rule_by_name
from sglang_kvmul.sim.rank import RankConfig

VOCAB = 32000
HASH_MASK = (1 << 63) - 1


def rank_prompts(
    rng: np.random.Generator, systems: list[list[int]], total_tokens: int, longest: int
) -> tuple[list[list[int]], list[int]]:
    """One rank's prompts, in arrival order: one agent session growing to `longest` (returned too)
    and conversations off shared system prompts (1-5 turns of 500-4000 tokens, each extending the last)."""
    prompts = []
    session = list(systems[0])
    while len(session) < longest:
        session += rng.integers(0, VOCAB, int(rng.integers(2000, 8000))).tolist()
        prompts.append(session[:longest])
    if not prompts:  # the system prompt alone reaches `longest`
        prompts.append(session[:longest])
    session = prompts[-1]
    used = len(session)
    while used < total_tokens:
        base = list(systems[int(rng.integers(len(systems)))])
        for _ in range(int(rng.integers(1, 6))):
            base += rng.integers(0, VOCAB, int(rng.integers(500, 4000))).tolist()
            prompts.append(list(base))
        used += len(base) - len(systems[0])
    return prompts, session


def busy_snapshot(rank: int) -> LoadSnapshotView:
    """A rank serving a batch below its cap, with prefill queued and a measured speed: what the rule
    reads in production (no snapshot would leave the capacity checks on their fast path)."""
    running = 100 + 20 * (rank % 5)
    return LoadSnapshotView(
        timestamp=1.0, num_running_reqs=running, num_waiting_reqs=rank % 3, num_waiting_uncached_tokens=4096,
        total_prefill_uncached_tokens=10**7, num_total_tokens=running * 3000, max_running_requests=256,
        max_total_num_tokens=10**6, total_prefill_busy_us=10**6,
    )  # fmt: skip


def busy_decode_moments(rank: int) -> list[float]:
    """SGLang's decode step-time sums for `busy_snapshot`'s rank: 10,000 steps, half at 10 requests
    below its batch and half at 10 above, 20 ms + 50 us per request (steps, sum b, sum t_us, sum b^2,
    sum b * t_us, generated)."""
    running = 100 + 20 * (rank % 5)
    pts = [(b, 20_000.0 + 50.0 * b) for b in (running - 10, running + 10)]
    n = 5_000
    return [2.0 * n, n * sum(b for b, _ in pts), n * sum(t for _, t in pts), n * sum(b * b for b, _ in pts),
            n * sum(b * t for b, t in pts), n * sum(b for b, _ in pts)]  # fmt: skip


def stored_events(prompts: list[list[int]], page: int) -> list[BlockStored]:
    """BlockStored events as SGLang emits them: new pages only, chained to their parent page, with
    content-chained hashes (the root page's is SGLang's own first-page hash)."""
    known: dict[int, int] = {}  # hash of a page -> hash of its parent (pages this rank holds)
    events = []
    for p in prompts:
        usable = len(p) - len(p) % page
        parent, i, h = None, 0, None
        while i < usable:
            h = first_page_hash(p, page) if i == 0 else hash((parent, tuple(p[i : i + page]))) & HASH_MASK
            if h not in known:
                break
            parent, i = h, i + page
        hashes, start = [], i
        while i < usable:
            h = first_page_hash(p, page) if i == 0 else hash((parent, tuple(p[i : i + page]))) & HASH_MASK
            known[h] = parent
            hashes.append(h)
            parent, i = h, i + page
        if hashes:
            chain_parent = known[hashes[0]]
            events.append(
                BlockStored(
                    block_hashes=hashes,
                    parent_block_hash=chain_parent,
                    token_ids=p[start:usable],
                    block_size=page,
                    lora_id=None,
                )
            )
    return events


def leaf_removals(events: list[BlockStored], rng: random.Random, share: float) -> list[BlockRemoved]:
    """Remove `share` of the stored chains that no other chain extends from (whole leaves, as
    SGLang evicts: never a page something else still hangs off)."""
    parents = {e.parent_block_hash for e in events}
    leaves = [e for e in events if not any(h in parents for h in e.block_hashes)]
    picked = rng.sample(leaves, max(1, int(share * len(leaves))))
    return [BlockRemoved(block_hashes=list(e.block_hashes)) for e in picked]


def median_us(fn: Callable[[], object], repeats: int, warmup: int = 5) -> tuple[float, float]:
    samples = []
    for i in range(repeats + warmup):
        t = time.perf_counter()
        fn()
        if i >= warmup:
            samples.append((time.perf_counter() - t) * 1e6)
    samples.sort()
    return statistics.median(samples), samples[int(0.9 * (len(samples) - 1))]


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096


# ---- Dynamo's indexer ----------------------------------------------------------------------
def dynamo_module():
    try:
        from dynamo import _core
    except ImportError:
        return None
    return _core


U64 = (1 << 64) - 1  # Dynamo's hashes are u64; SGLang's may be negative i64 (same bits)


def dynamo_stored(ev: BlockStored, core, page: int, event_id: int) -> bytes:
    local = core.compute_block_hash_for_seq(list(ev.token_ids), page)
    blocks = [{"block_hash": h & U64, "tokens_hash": t} for h, t in zip(ev.block_hashes, local, strict=True)]
    parent = None if ev.parent_block_hash is None else ev.parent_block_hash & U64
    data = {"stored": {"parent_hash": parent, "blocks": blocks}}
    return json.dumps({"event_id": event_id, "data": data}).encode()


def dynamo_removed(ev: BlockRemoved, event_id: int) -> bytes:
    removed = {"block_hashes": [h & U64 for h in ev.block_hashes]}
    return json.dumps({"event_id": event_id, "data": {"removed": removed}}).encode()


# ---- one rank count ----------------------------------------------------------------------
def _ingest_ours(n_ranks: int, ps: int, per_rank: list, stored_tokens: int, seed: int, rule: str) -> dict:
    """Our router (deciding by `rule`): ingest every rank's events, remove 10% of the leaves, restore
    them (all timed)."""
    # ranks that chunk their prefills (the simulator's 8192): prompts past one chunk take the default's
    # chunked-slack pass over the ranks
    router = KvmulRouter(n_ranks, ps, rule=rule_by_name(rule), chunk_tokens=RankConfig().chunk_tokens)
    t0 = time.perf_counter()
    for r, evs in enumerate(per_rank):
        router.apply_events(r, evs)
    ingest_s = time.perf_counter() - t0
    mirrored = sum(m.num_tokens for m in router.mirrors)
    assert mirrored == stored_tokens, (mirrored, stored_tokens)
    pyrng = random.Random(seed)
    removals = [leaf_removals(evs, pyrng, 0.1) for evs in per_rank]
    t0 = time.perf_counter()
    for r, evs in enumerate(removals):
        router.apply_events(r, evs)
    remove_s = time.perf_counter() - t0
    removed_pages = (stored_tokens - sum(m.num_tokens for m in router.mirrors)) // ps
    restore = []
    for evs, rms in zip(per_rank, removals, strict=True):
        gone = {h for rm in rms for h in rm.block_hashes}
        restore.append([e for e in evs if e.block_hashes[-1] in gone])
    for r, evs in enumerate(restore):
        router.apply_events(r, evs)
    assert sum(m.num_tokens for m in router.mirrors) == stored_tokens
    return {"router": router, "ingest_s": ingest_s, "remove_s": remove_s, "removed_pages": removed_pages,
            "removals": removals, "restore": restore}  # fmt: skip


def _memory_per_token(n_ranks: int, ps: int, per_rank: list, stored_tokens: int) -> float:
    tracemalloc.start()
    probe = KvmulRouter(n_ranks, ps)
    for r, evs in enumerate(per_rank):
        probe.apply_events(r, evs)
    mem = tracemalloc.get_traced_memory()[0] / stored_tokens
    tracemalloc.stop()
    return mem


def _ingest_dynamo(core, ps: int, per_rank: list, ours: dict, stored_tokens: int) -> dict:
    """Dynamo's RadixTree given the same events, removals and restores."""
    tree = core.RadixTree()
    encoded = [[dynamo_stored(e, core, ps, i) for i, e in enumerate(evs)] for evs in per_rank]
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    for r, evs in enumerate(encoded):
        for b in evs:
            tree.apply_event(r, b)
    ingest_s = time.perf_counter() - t0
    mem = (rss_bytes() - rss0) / stored_tokens
    rm_encoded = [[dynamo_removed(e, 10**6 + i) for i, e in enumerate(evs)] for evs in ours["removals"]]
    t0 = time.perf_counter()
    for r, evs in enumerate(rm_encoded):
        for b in evs:
            tree.apply_event(r, b)
    remove_s = time.perf_counter() - t0
    for r, evs in enumerate(ours["restore"]):
        for i, e in enumerate(evs):
            tree.apply_event(r, dynamo_stored(e, core, ps, 2 * 10**6 + i))
    return {"tree": tree, "ingest_s": ingest_s, "remove_s": remove_s, "mem": mem}


def _run_ranks_alone(n_ranks: int, args: argparse.Namespace) -> list[dict]:
    core = None if args.no_dynamo else dynamo_module()
    return run_ranks(n_ranks, args, np.random.default_rng(n_ranks), core)


def run_ranks(n_ranks: int, args: argparse.Namespace, rng: np.random.Generator, core) -> list[dict]:
    ps = args.page_size
    longest = max(args.prompts) // 2 + ps
    systems = [rng.integers(0, VOCAB, 2048).tolist() for _ in range(4)]
    built = [rank_prompts(rng, systems, args.tokens_per_rank, longest) for _ in range(n_ranks)]
    per_rank = [stored_events(p, ps) for p, _ in tqdm(built, desc=f"{n_ranks} ranks: events", leave=False)]
    session = built[0][1]
    del built
    stored_tokens = sum(len(e.token_ids) for evs in per_rank for e in evs)
    ours = _ingest_ours(n_ranks, ps, per_rank, stored_tokens, seed=n_ranks, rule=args.rule)
    router = ours["router"]
    for r in range(n_ranks):  # each rank's load as its scheduler reports it: busy, capacity known
        router.apply_snapshot(r, busy_snapshot(r), now=1.0)
        # and its decode cost measured: the router pools SGLang's step-time sums with the requests its
        # ledger saw past prefill, none here (nothing was dispatched), so they are given as the batch
        snap = busy_snapshot(r)
        router.decode_cost.update(r, busy_decode_moments(r), snap.total_prefill_busy_us,
                                  snap.total_prefill_uncached_tokens, snap.num_running_reqs)  # fmt: skip
    # the default's decode and turnover terms must be on the timed path, not skipped as unmeasured
    dc = router.decode_cost
    assert dc.tokens_per_request > 0 and dc.batch_mean > 2 and dc.output_tokens > 0
    mem = _memory_per_token(n_ranks, ps, per_rank, stored_tokens) if n_ranks <= args.tracemalloc_max_ranks else None
    dyn = _ingest_dynamo(core, ps, per_rank, ours, stored_tokens) if core is not None else None
    rows = []
    for plen in args.prompts:
        shared = session[: plen // 2]
        prompt = shared + rng.integers(0, VOCAB, plen - len(shared)).tolist()
        limit = len(prompt) - 1
        d = router.decide(prompt, limit=limit)
        assert d.cached[0] >= len(shared) - len(shared) % ps, (d.cached[0], len(shared))  # the walk goes deep
        root = router.root_hash(prompt)
        dec_med, dec_p90 = median_us(lambda p=prompt, lim=limit: router.decide(p, limit=lim), args.repeats)
        match_med, _ = median_us(lambda p=prompt, r=root, lim=limit: router.index.match_all(p, r, lim), args.repeats)
        row = {
            "ranks": n_ranks,
            "prompt_tokens": plen,
            "decision_median_us": dec_med,
            "decision_p90_us": dec_p90,
            "match_median_us": match_med,
            "ingest_tokens_per_s": stored_tokens / ours["ingest_s"],
            "remove_tokens_per_s": ours["removed_pages"] * ps / ours["remove_s"],
            "bytes_per_mirrored_token": mem,
            "mirrored_tokens_per_rank": stored_tokens / n_ranks,
            "segments": router.index.num_segments,
        }
        if dyn is not None:
            row |= _dynamo_row(core, dyn, prompt, shared, ps, args.repeats, stored_tokens, ours["removed_pages"])
        rows.append(row)
    return rows


def _dynamo_row(core, dyn: dict, prompt, shared, ps: int, repeats: int, stored_tokens: int, removed: int) -> dict:
    tree = dyn["tree"]

    def dyn_decide(p=prompt, tree=tree):
        return tree.find_matches(core.compute_block_hash_for_seq(p, ps))

    scores = dyn_decide().scores
    assert scores.get((0, 0), 0) * ps >= len(shared) - len(shared) % ps, scores  # same deep walk
    med, p90 = median_us(dyn_decide, repeats)
    return {
        "dynamo_median_us": med,
        "dynamo_p90_us": p90,
        "dynamo_ingest_tokens_per_s": stored_tokens / dyn["ingest_s"],
        "dynamo_remove_tokens_per_s": removed * ps / dyn["remove_s"],
        "dynamo_bytes_per_token_rss": dyn["mem"],
    }


TARGETS = {(16, 32768): 200.0, (16, 131072): 1000.0}


def table(rows: list[dict]) -> str:
    lines = [
        "| ranks | prompt tokens | decision median us (p90) | match only | Dynamo median us (p90) | ours / Dynamo | "
        "target | ingest tok/s (Dynamo) | remove tok/s (Dynamo) | B/token (Dynamo RSS) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        dyn = r.get("dynamo_median_us")
        target = TARGETS.get((r["ranks"], r["prompt_tokens"]))
        met = "" if target is None else f"< {target:.0f}: {'met' if r['decision_median_us'] < target else 'NOT met'}"
        mem = "n/a" if r["bytes_per_mirrored_token"] is None else f"{r['bytes_per_mirrored_token']:.1f}"
        vs = f"{dyn:.0f} ({r['dynamo_p90_us']:.0f}) | {r['decision_median_us'] / dyn:.2f} | " if dyn else "n/a | n/a | "
        lines.append(
            f"| {r['ranks']} | {r['prompt_tokens']} | {r['decision_median_us']:.0f} ({r['decision_p90_us']:.0f}) | "
            f"{r['match_median_us']:.0f} | "
            + vs
            + f"{met} | {r['ingest_tokens_per_s']:.3g} ({r.get('dynamo_ingest_tokens_per_s', float('nan')):.3g}) | "
            f"{r['remove_tokens_per_s']:.3g} ({r.get('dynamo_remove_tokens_per_s', float('nan')):.3g}) | "
            f"{mem} ({r.get('dynamo_bytes_per_token_rss', float('nan')):.1f}) |"
        )
    lines.append("\nTargets: 32k prompt x 16 ranks < 200 us, 128k < 1 ms (median); ingestion >= 2M tokens/s.")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], ranks: list[int], path, ps: int, tokens: int) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, n_ranks in enumerate(ranks):
        pts = [r for r in rows if r["ranks"] == n_ranks]
        xs = [p["prompt_tokens"] for p in pts]
        ax.plot(xs, [p["decision_median_us"] for p in pts], "o-", color=f"C{i}", label=f"kvmul, {n_ranks} ranks")
        if pts and "dynamo_median_us" in pts[0]:
            ax.plot(xs, [p["dynamo_median_us"] for p in pts], "s--", color=f"C{i}", label=f"Dynamo, {n_ranks} ranks")
    for (_, plen), us in TARGETS.items():
        ax.plot([plen], [us], "k*", ms=10)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("median decision latency (us)")
    ax.set_title(f"page size {ps}, ~{tokens:,} tokens/rank (stars: targets at 16 ranks)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens-per-rank", type=int, default=1_000_000)
    ap.add_argument("--ranks", default="2,16,64,128")
    ap.add_argument("--prompts", default="1024,8192,32768,131072")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--tracemalloc-max-ranks", type=int, default=16, help="memory probe cost grows with ranks")
    ap.add_argument("--no-dynamo", action="store_true")
    ap.add_argument("--name", default="decision_latency")
    ap.add_argument("--rule", default=DEFAULT_RULE, help="the routing rule decide() scores with (the serving default)")
    args = ap.parse_args()
    ranks = [int(x) for x in args.ranks.split(",")]
    args.prompts = [int(x) for x in args.prompts.split(",")]
    core = None if args.no_dynamo else dynamo_module()
    rows = []
    # each rank count in a fresh process, seeded by it: no heap left over from the previous count
    # (at 128 ranks, ~1.4 GB of mirrors), so each point reads as it would run alone
    with multiprocessing.get_context("fork").Pool(1, maxtasksperchild=1) as pool:
        for n_ranks in tqdm(ranks, desc="rank counts"):
            rows += pool.apply(_run_ranks_alone, (n_ranks, args))
            tqdm.write(table([r for r in rows if r["ranks"] == n_ranks]))
    cfg = {**vars(args), "dynamo": core is not None}
    write_results(args.name, __doc__, {"config": cfg, "rows": rows}, table(rows))
    plot(rows, ranks, RESULTS / f"{args.name}.png", args.page_size, args.tokens_per_rank)


if __name__ == "__main__":
    main()
