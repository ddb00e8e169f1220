"""Fit the simulator's `LinearCost` to step times measured on the real CPU SGLang server.

One dp=1 server of the built-in model (one core), each measurement on an idle server with its cache
flushed first:
  * prefill: one request of N prompt tokens and 1 output token; its TTFT is one prefill step plus the
    fixed HTTP/tokenizer path, fitted as `a + b*N + c*N^2/2` (attention over the prompt itself);
  * decode: B concurrent requests of 64-token prompts and 33 output tokens; the mean time per output
    token (bench_serving's TPOT definition) is one decode step at batch B, fitted as
    `d + e*B + f*B*context`.
Writes benchmarks/results/sim/cpu_cost_fit.{json,md,png}; the `cpu-<model>` profile in
`sglang_kvmul/sim/cost.py` copies the fitted numbers from there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import aiohttp
import numpy as np
import requests
from tqdm import tqdm

from benchmarks.common import RESULTS, pyplot
from sglang_kvmul.harness.local_server import cpu_server_args, running_server
from sglang_kvmul.harness.tiny_model import VOCAB, build
from sglang_kvmul.sim.cost import FITTED

POOL = 16384  # KV tokens of the fitted server


async def one_request(
    session: aiohttp.ClientSession, url: str, ids: list[int], out: int, extra: dict | None = None
) -> tuple[float, float]:
    """(TTFT, mean time per output token after the first) of one streamed request (`extra`: more
    /generate fields, such as `routed_dp_rank`)."""
    body = {
        "input_ids": ids,
        "stream": True,
        "sampling_params": {"max_new_tokens": out, "temperature": 0, "ignore_eos": True},
        **(extra or {}),
    }
    t0 = time.perf_counter()
    first = last = None
    async with session.post(url + "/generate", json=body) as resp:
        resp.raise_for_status()
        async for raw in resp.content:
            if raw.startswith(b"data:") and not raw.startswith(b"data: [DONE]"):
                last = time.perf_counter()
                first = first or last
    return first - t0, (last - first) / max(1, out - 1)


async def _batch(url: str, prompts: list[list[int]], out: int) -> list[tuple[float, float]]:
    async with aiohttp.ClientSession() as session:
        return await asyncio.gather(*(one_request(session, url, p, out) for p in prompts))


def plot(prefill: list, decode: list, pre: tuple, dec: tuple, path) -> None:
    """Measured points and the fitted curves, prefill and decode side by side."""
    (pa, pb, pc), (da, db, dc) = pre, dec
    n, t = np.array(prefill, dtype=float).T
    b, s = np.array(decode, dtype=float).T
    plt = pyplot()

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(n, t, "o", label="measured")
    xs = np.linspace(0, n.max(), 50)
    ax1.plot(xs, pa + pb * xs + pc * xs * xs / 2, "-", label="fit")
    ax1.set_xlabel("prompt tokens")
    ax1.set_ylabel("TTFT (s)")
    ax1.legend()
    ax2.plot(b, s, "o", label="measured")
    xs = np.linspace(1, b.max(), 50)
    ax2.plot(xs, da + db * xs + dc * xs * 80, "-", label="fit")
    ax2.set_xlabel("decode batch")
    ax2.set_ylabel("time per decode step (s)")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bench")
    ap.add_argument("--prompt-lens", default="64,256,512,1024,2048,3072")
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model = build(args.model)
    rng = np.random.default_rng(0)
    work = RESULTS / "sim"
    work.mkdir(parents=True, exist_ok=True)
    prefill, decode = [], []
    log = RESULTS / "sim.work" / "cpu_cost_fit.server.log"  # (gitignored)
    with running_server(model, cpu_server_args(POOL), log) as srv:
        asyncio.run(_batch(srv.url, [rng.integers(3, VOCAB, 256).tolist()], 4))  # first-call costs
        for n in tqdm([int(x) for x in args.prompt_lens.split(",")] * args.repeats, desc="prefill"):
            requests.post(srv.url + "/flush_cache", timeout=60).raise_for_status()
            ttft, _ = asyncio.run(_batch(srv.url, [rng.integers(3, VOCAB, n).tolist()], 1))[0]
            prefill.append((n, ttft))
        for b in tqdm([int(x) for x in args.batches.split(",")] * args.repeats, desc="decode"):
            requests.post(srv.url + "/flush_cache", timeout=60).raise_for_status()
            res = asyncio.run(_batch(srv.url, [rng.integers(3, VOCAB, 64).tolist() for _ in range(b)], 33))
            decode.append((b, float(np.median([tpot for _, tpot in res]))))
    n, t = np.array(prefill, dtype=float).T
    pa, pb, pc = np.linalg.lstsq(np.stack([np.ones_like(n), n, n * n / 2], 1), t, rcond=None)[0]
    b, s = np.array(decode, dtype=float).T
    ctx = b * (64 + 16)  # mean context per decode step: prompt + half the output
    da, db, dc = np.linalg.lstsq(np.stack([np.ones_like(b), b, ctx], 1), s, rcond=None)[0]
    fit = {
        "prefill": {"fixed_s": pa, "per_token_s": pb, "attn_token_ctx_s": pc},
        "decode": {"step_s": da, "per_request_s": db, "per_context_token_s": dc},
    }
    report = {"config": vars(args), "fit": fit, "prefill_samples": prefill, "decode_samples": decode}
    (work / "cpu_cost_fit.json").write_text(json.dumps(report, indent=1))
    # the simulator's `cpu-bench` profile loads this (sim/cost.py): no copying of numbers by hand
    profile = {"source": "benchmarks/fit_cpu_cost.py", "kv_tokens": POOL, "kv_dtype": "bf16", "fit": fit}
    (FITTED / "cpu-bench.json").write_text(json.dumps(profile, indent=1))
    lines = [
        "# cpu_cost_fit\n", __doc__.strip(), "",
        "| term | fitted |", "|---|---|",
        *(f"| {k}.{kk} | {vv:.3e} |" for k, v in fit.items() for kk, vv in v.items()),
        "", "| prompt tokens | TTFT s (measured) | fitted |", "|---|---|---|",
        *(f"| {int(x)} | {y:.4f} | {pa + pb * x + pc * x * x / 2:.4f} |" for x, y in prefill),
        "", "| batch | decode step s (measured) | fitted |", "|---|---|---|",
        *(f"| {int(x)} | {y:.4f} | {da + db * x + dc * x * 80:.4f} |" for x, y in decode),
    ]  # fmt: skip
    (work / "cpu_cost_fit.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    plot(prefill, decode, (pa, pb, pc), (da, db, dc), work / "cpu_cost_fit.png")


if __name__ == "__main__":
    main()
