"""Open-loop load generator for SGLang's /generate: exact `input_ids`, seeded arrivals, streamed TTFT.

Shared by the benchmarks. TTFT is the time to the first streamed chunk; cached tokens and the
serving DP rank come from SGLang's `meta_info` in the last chunk.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass

import aiohttp
from tqdm import tqdm


@dataclass
class Request:
    idx: int
    group: int
    arrival: float  # seconds after the start
    input_ids: list[int]
    max_new_tokens: int


@dataclass
class Result:
    idx: int
    group: int
    arrival: float
    prompt_tokens: int
    ttft: float | None = None
    e2e: float | None = None
    cached_tokens: int = 0
    dp_rank: int | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def shared_prefix_workload(
    groups: int, per_group: int, prefix_len: int, suffix_len: int, out_len: int, rate: float, seed: int, vocab: int
) -> list[Request]:
    """`groups` random prefixes, each shared by `per_group` requests with their own suffix.

    The (group, request) pairs are shuffled so that neither round-robin nor arrival order lines
    requests up with ranks by accident; arrivals are Poisson at `rate` requests per second.
    """
    rng = random.Random(seed)
    prefixes = [[rng.randrange(3, vocab) for _ in range(prefix_len)] for _ in range(groups)]
    pairs = [(g, k) for g in range(groups) for k in range(per_group)]
    rng.shuffle(pairs)
    t = 0.0
    out = []
    for i, (g, _) in enumerate(pairs):
        suffix = [rng.randrange(3, vocab) for _ in range(suffix_len)]
        out.append(Request(i, g, t, prefixes[g] + suffix, out_len))
        t += rng.expovariate(rate)
    return out


async def _one(session: aiohttp.ClientSession, url: str, req: Request, t0: float, res: Result, rid: str) -> None:
    body = {
        "rid": rid,
        "input_ids": req.input_ids,
        "stream": True,
        "sampling_params": {"max_new_tokens": req.max_new_tokens, "temperature": 0, "ignore_eos": True},
    }
    await asyncio.sleep(max(0.0, t0 + req.arrival - time.perf_counter()))  # open-loop arrival schedule
    start = time.perf_counter()
    last = None
    try:
        async with session.post(url + "/generate", json=body) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:") or line == b"data: [DONE]":
                    continue
                if res.ttft is None:
                    res.ttft = time.perf_counter() - start
                last = json.loads(line[5:])
        res.e2e = time.perf_counter() - start
        meta = (last or {}).get("meta_info", {})
        res.cached_tokens = int(meta.get("cached_tokens", 0))
        res.dp_rank = meta.get("dp_rank")
    except (TimeoutError, aiohttp.ClientError) as exc:
        res.error = repr(exc)


async def _run(url: str, reqs: list[Request], desc: str, rid_prefix: str) -> list[Result]:
    results = [Result(r.idx, r.group, r.arrival, len(r.input_ids)) for r in reqs]
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        t0 = time.perf_counter()
        tasks = [
            asyncio.create_task(_one(session, url, r, t0, res, f"{rid_prefix}{r.idx}"))
            for r, res in zip(reqs, results, strict=True)
        ]
        with tqdm(total=len(tasks), desc=desc, unit="req", leave=False) as bar:
            for fut in asyncio.as_completed(tasks):
                await fut
                bar.update(1)
    return results


def replay(url: str, reqs: list[Request], desc: str = "requests", rid_prefix: str = "req-") -> list[Result]:
    """Send `reqs` on their arrival schedule; request i gets the rid `rid_prefix + str(i)`."""
    return asyncio.run(_run(url, reqs, desc, rid_prefix))
