"""How much two busy CPU ranks slow each other down: the one effect the simulator leaves out on purpose.

On the benchmark machine (2 cores) a dp=2 server pins each rank to one core, and the HTTP server,
tokenizer, detokenizer, controller and client share the same two cores. The simulator's `cpu-bench`
profile (`fit_cpu_cost.py`) was fitted on one rank alone, and simulated ranks never slow each other,
as GPUs do not. A rule that spreads work over both ranks at once pays for this on the CPU server and
not in the simulator; one that piles work on one rank does not.

One dp=2 server of the built-in model (our launcher; requests pinned with `routed_dp_rank`, so no
rule is involved), cache flushed before every measurement, alone and together interleaved:
  * prefill: an N-token prompt (1 output token) on rank 0, alone, at the same time as another
    N-token prompt on rank 1, and (the largest N) while rank 1 decodes B requests: TTFT;
  * decode: B requests of 64-token prompts and 33 output tokens on rank 0 (time per output token),
    alone, with B more decoding on rank 1, and with rank 1 prefilling long prompts meanwhile.
Reported as together / alone medians, side by side in one run. Writes
benchmarks/results/cpu_contention.{json,md,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from collections.abc import Callable

import aiohttp
import numpy as np
import requests
from tqdm import tqdm

from benchmarks.common import RESULTS, pyplot
from benchmarks.fit_cpu_cost import DECODE_OUTPUTS, DECODE_PROMPT, one_request
from sglang_kvmul.harness.local_server import cpu_server_args, running_server
from sglang_kvmul.harness.tiny_model import VOCAB, build

POOL = 16384  # KV tokens per rank


async def _pinned(url: str, jobs: list[tuple[int, list[int], int]]) -> list[tuple[float, float]]:
    """(TTFT, time per output token) of each (rank, prompt, outputs) job, all sent at once."""
    async with aiohttp.ClientSession() as session:
        return await asyncio.gather(*(one_request(session, url, p, out, {"routed_dp_rank": r}) for r, p, out in jobs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bench")
    ap.add_argument("--prompt-lens", default="1024,2048")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    model = build(args.model)
    rng = np.random.default_rng(0)

    def prompt(n: int) -> list[int]:
        return rng.integers(3, VOCAB, n).tolist()

    b = args.batch

    def decoding(rank: int, outputs: int = DECODE_OUTPUTS) -> list[tuple[int, list[int], int]]:
        return [(rank, prompt(DECODE_PROMPT), outputs) for _ in range(b)]

    def prefilling(rank: int) -> list[tuple[int, list[int], int]]:
        return [(rank, prompt(3000), 1) for _ in range(3)]  # distinct prompts: no cache hits among them

    # what is timed each round: the round's jobs, and the figure read (0: TTFT, 1: time per output token)
    rounds: dict[str, tuple[Callable[[], list[tuple[int, list[int], int]]], int]] = {}
    cases: list[tuple[str, str, str]] = []  # (case, its round alone, its round together)
    lens = [int(x) for x in args.prompt_lens.split(",")]
    for n in lens:
        rounds[f"prefill {n}"] = (lambda n=n: [(0, prompt(n), 1)], 0)
        rounds[f"prefill {n} x2"] = (lambda n=n: [(0, prompt(n), 1), (1, prompt(n), 1)], 0)
        cases.append((f"prefill {n} tokens", f"prefill {n}", f"prefill {n} x2"))
    n = max(lens)  # rank 1 decodes long enough to outlast rank 0's prefill
    rounds[f"prefill {n} + decode"] = (lambda: [(0, prompt(n), 1), *decoding(1, 8 * b)], 0)
    cases.append((f"prefill {n} tokens, rank 1 decoding", f"prefill {n}", f"prefill {n} + decode"))
    rounds["decode"] = (lambda: decoding(0), 1)  # one baseline for both decode cases
    rounds["decode x2"] = (lambda: decoding(0) + decoding(1), 1)
    rounds["decode + prefill"] = (lambda: decoding(0) + prefilling(1), 1)
    cases.append((f"decode batch {b}", "decode", "decode x2"))
    cases.append((f"decode batch {b}, rank 1 prefilling", "decode", "decode + prefill"))
    times: dict[str, list[float]] = {key: [] for key in rounds}
    log = RESULTS / "sim.work" / "cpu_contention.server.log"  # (gitignored)
    log.parent.mkdir(parents=True, exist_ok=True)
    with running_server(model, ["--dp-size", "2", *cpu_server_args(POOL)], log) as srv:
        asyncio.run(_pinned(srv.url, [(r, prompt(256), 4) for r in (0, 1)]))  # first-call costs on both ranks
        for _ in tqdm(range(args.repeats), desc="cpu contention"):
            for key, (jobs_of, metric) in rounds.items():  # alone and together interleaved: drift hits both alike
                requests.post(srv.url + "/flush_cache", timeout=60).raise_for_status()
                jobs = jobs_of()
                res = asyncio.run(_pinned(srv.url, jobs))
                mine = [x[metric] for (rank, _, _), x in zip(jobs, res, strict=True) if rank == 0]
                times[key].append(float(np.median(mine)))

    rows = []
    for case, alone_key, together_key in cases:
        alone, together = float(np.median(times[alone_key])), float(np.median(times[together_key]))
        rows.append({
            "case": case, "alone_s": alone, "together_s": together, "ratio": together / alone,
            "alone": times[alone_key], "together": times[together_key],
        })  # fmt: skip
    report = {"config": vars(args), "cores": os.cpu_count(), "rows": rows}
    (RESULTS / "cpu_contention.json").write_text(json.dumps(report, indent=1))
    lines = [
        "# cpu_contention\n", __doc__.strip(), "",
        "| case (rank 0's figure) | alone, median s | together, median s | together / alone |", "|---|---|---|---|",
        *(f"| {r['case']} | {r['alone_s']:.4f} | {r['together_s']:.4f} | {r['ratio']:.2f} |" for r in rows),
    ]  # fmt: skip
    (RESULTS / "cpu_contention.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh([r["case"] for r in rows], [r["ratio"] for r in rows])
    ax.axvline(1.0, color="k", lw=1)
    ax.set_xlabel("rank 0's time, together / alone (1 = no slowdown)")
    fig.tight_layout()
    fig.savefig(RESULTS / "cpu_contention.png", dpi=100)


if __name__ == "__main__":
    main()
