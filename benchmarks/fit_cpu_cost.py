"""Fit the simulator's `LinearCost` to step times measured on the real CPU SGLang server.

One dp=1 server of the built-in model (one core), each measurement on an idle server with its cache
flushed first:
  * prefill: one request of N prompt tokens and 1 output token; its TTFT is one prefill step plus the
    fixed HTTP/tokenizer path, fitted as `a + b*N + c*N^2/2` (attention over the prompt itself);
  * prefill after a cached prefix: C tokens sent (and cached) first, then the same C plus N new
    ones. Two attention models are fitted to all prefill points, new tokens over the whole context
    (`c*N*(C + N/2)`, what a GPU kernel does) and the whole sequence as if new (`c*(C + N)^2/2`,
    what SGLang's torch_native backend does: it pads the query over the prefix); the one with the
    smaller error is kept (`attn_whole_sequence`);
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
from sglang_kvmul.sim.cost import FITTED, LinearCost

POOL = 16384  # KV tokens of the fitted server
CACHED_NEW = 64  # new tokens after a cached prefix
DECODE_PROMPT, DECODE_OUTPUTS = 64, 33  # each decode measurement's requests (cpu_contention's too)
DECODE_CONTEXT = DECODE_PROMPT + DECODE_OUTPUTS // 2  # their mean context per decode step
SOURCE = "benchmarks/fit_cpu_cost.py (real CPU SGLang server, built-in `bench` model, one rank on one core)"


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


MODEL_NAME = {False: "new tokens", True: "whole sequence"}


def fit_samples(prefill: list, cached: list, decode: list) -> tuple[dict, dict[str, LinearCost], dict[bool, float]]:
    """The fit's terms, a `LinearCost` per attention model (the kept one has the smaller mean
    relative error over every prefill point), and those errors. Pure: the saved samples refit
    to the saved profile (tests/test_settings.py)."""
    pts = np.array([(0, x, y) for x, y in prefill] + [(c, CACHED_NEW, y) for c, y in cached], dtype=float)
    c_, n_, t_ = pts.T  # every prefill point as (cached C, new N, TTFT)
    b, s = np.array(decode, dtype=float).T
    da, db, dc = np.linalg.lstsq(np.stack([np.ones_like(b), b, b * DECODE_CONTEXT], 1), s, rcond=None)[0]
    fits, errors = {}, {}
    for whole, attn in {False: n_ * (c_ + n_ / 2), True: (c_ + n_) ** 2 / 2}.items():
        x = np.stack([np.ones_like(n_), n_, attn], 1)
        fits[whole] = np.linalg.lstsq(x, t_, rcond=None)[0]
        errors[whole] = float(np.mean(np.abs(x @ fits[whole] / t_ - 1)))
    whole = errors[True] < errors[False]
    pa, pb, pc = fits[whole]
    fit = {
        "prefill": {"fixed_s": pa, "per_token_s": pb, "attn_token_ctx_s": pc, "attn_whole_sequence": bool(whole)},
        "decode": {"step_s": da, "per_request_s": db, "per_context_token_s": dc},
    }  # fmt: skip
    costs = {
        MODEL_NAME[w]: LinearCost(
            prefill_fixed_s=f[0], prefill_token_s=f[1], attn_token_ctx_s=f[2], attn_whole_sequence=w,
            decode_step_s=da, decode_req_s=db, decode_ctx_s=dc,
        )
        for w, f in fits.items()
    }  # fmt: skip
    return fit, costs, errors


def _cell(v: float | bool) -> str:
    return str(v) if isinstance(v, bool) else f"{v:.3e}"


def plot(prefill: list, cached: list, decode: list, costs: dict[str, LinearCost], path) -> None:
    """Measured points and the fitted curves: cold prefill, prefill after a cached prefix (both
    attention models), decode (the same fit in both)."""
    n, t = np.array(prefill, dtype=float).T
    c, tc = np.array(cached, dtype=float).T
    b, s = np.array(decode, dtype=float).T
    plt = pyplot()

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(14, 4))
    ax1.plot(n, t, "o", label="measured")
    ax2.plot(c, tc, "o", label="measured")
    xs, cs = np.linspace(0, n.max(), 50), np.linspace(0, c.max(), 50)
    for name, cost in costs.items():
        ax1.plot(xs, [cost.prefill_s(int(x), 0, 1) for x in xs], "-", label=f"fit, {name}")
        ax2.plot(cs, [cost.prefill_s(CACHED_NEW, int(x), 1) for x in cs], "-", label=f"fit, {name}")
    ax1.set_xlabel("prompt tokens (none cached)")
    ax2.set_xlabel(f"cached prefix tokens ({CACHED_NEW} new)")
    ax1.set_ylabel("TTFT (s)")
    ax1.legend()
    ax2.legend()
    ax3.plot(b, s, "o", label="measured")
    xs = np.linspace(1, b.max(), 50)
    ax3.plot(xs, [next(iter(costs.values())).decode_s(int(x), int(x) * DECODE_CONTEXT) for x in xs], "-", label="fit")
    ax3.set_xlabel("decode batch")
    ax3.set_ylabel("time per decode step (s)")
    ax3.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bench")
    ap.add_argument("--prompt-lens", default="64,256,512,1024,2048,3072")
    ap.add_argument("--cached-lens", default="1000,2000,4000", help="cached prefixes C (N = 64 new tokens)")
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model = build(args.model)
    rng = np.random.default_rng(0)
    work = RESULTS / "sim"
    work.mkdir(parents=True, exist_ok=True)
    prefill, cached, decode = [], [], []
    log = RESULTS / "sim.work" / "cpu_cost_fit.server.log"  # (gitignored)
    with running_server(model, cpu_server_args(POOL), log) as srv:
        for n in [256, *(int(x) for x in args.prompt_lens.split(","))]:  # first-call costs of each shape (not kept)
            asyncio.run(_batch(srv.url, [rng.integers(3, VOCAB, n).tolist()], 4))
        for n in tqdm([int(x) for x in args.prompt_lens.split(",")] * args.repeats, desc="prefill"):
            requests.post(srv.url + "/flush_cache", timeout=60).raise_for_status()
            ttft, _ = asyncio.run(_batch(srv.url, [rng.integers(3, VOCAB, n).tolist()], 1))[0]
            prefill.append((n, ttft))
        for c in tqdm([int(x) for x in args.cached_lens.split(",")] * args.repeats, desc="prefill after a prefix"):
            requests.post(srv.url + "/flush_cache", timeout=60).raise_for_status()
            prefix = rng.integers(3, VOCAB, c).tolist()
            asyncio.run(_batch(srv.url, [[*prefix, 3]], 1))  # caches the prefix (the last token is computed)
            ttft, _ = asyncio.run(_batch(srv.url, [prefix + rng.integers(3, VOCAB, CACHED_NEW).tolist()], 1))[0]
            cached.append((c, ttft))
        for b in tqdm([int(x) for x in args.batches.split(",")] * args.repeats, desc="decode"):
            requests.post(srv.url + "/flush_cache", timeout=60).raise_for_status()
            prompts = [rng.integers(3, VOCAB, DECODE_PROMPT).tolist() for _ in range(b)]
            res = asyncio.run(_batch(srv.url, prompts, DECODE_OUTPUTS))
            decode.append((b, float(np.median([tpot for _, tpot in res]))))
    fit, costs, errors = fit_samples(prefill, cached, decode)
    whole = fit["prefill"]["attn_whole_sequence"]
    fitted = costs[MODEL_NAME[whole]]
    report = {
        "config": vars(args), "fit": fit, "prefill_samples": prefill, "cached_prefill_samples": cached,
        "decode_samples": decode,
        "attention_model_mean_rel_error": {MODEL_NAME[w]: e for w, e in errors.items()},
    }  # fmt: skip
    (work / "cpu_cost_fit.json").write_text(json.dumps(report, indent=1))
    # the simulator's `cpu-bench` profile loads this (sim/cost.py): no copying of numbers by hand
    profile = {"source": SOURCE, "kv_tokens": POOL, "kv_dtype": "bf16", "fit": fit}
    (FITTED / "cpu-bench.json").write_text(json.dumps(profile, indent=1))
    lines = [
        "# cpu_cost_fit\n", __doc__.strip(), "",
        "| term | fitted |", "|---|---|",
        *(f"| {k}.{kk} | {_cell(vv)} |" for k, v in fit.items() for kk, vv in v.items()),
        "", "Attention model, mean relative error over every prefill point: new tokens over the context "
        f"{errors[False]:.1%}, the whole sequence {errors[True]:.1%}; kept: {MODEL_NAME[whole]}.",
        "", "| cached prefix | new tokens | TTFT s (measured) | fitted |", "|---|---|---|---|",
        *(f"| 0 | {int(x)} | {y:.4f} | {fitted.prefill_s(int(x), 0, 1):.4f} |" for x, y in prefill),
        *(f"| {int(c)} | {CACHED_NEW} | {y:.4f} | {fitted.prefill_s(CACHED_NEW, int(c), 1):.4f} |" for c, y in cached),
        "", "| batch | decode step s (measured) | fitted |", "|---|---|---|",
        *(f"| {int(x)} | {y:.4f} | {fitted.decode_s(int(x), int(x) * DECODE_CONTEXT):.4f} |" for x, y in decode),
    ]  # fmt: skip
    (work / "cpu_cost_fit.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    plot(prefill, cached, decode, costs, work / "cpu_cost_fit.png")


if __name__ == "__main__":
    main()
