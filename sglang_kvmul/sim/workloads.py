"""Request streams for comparisons and simulations, with exact token ids and arrival times.

* `mooncake`: the real Mooncake conversation trace, subsampled by conversation (whole prefix groups)
  and time-compressed. Each 512-token hash id becomes a fixed run of token ids, so requests that
  share hash ids share exactly that prefix, and prompts are exactly `input_length` long (SGLang's
  bench_serving `mooncake` option shortens them to about a quarter).
* `agentic`: multi-turn agent sessions: a long system/tool prefix shared by every session, a
  history that grows each turn by tool results and the previous reply, think/tool pauses between
  turns. Defaults are the TraceLab sample's medians/means (shared prefix 6912 tokens, +2129 tokens
  and 597 output tokens per turn on average, ~10 turns, 4.2 s mean tool time).
* `api`: a few long shared system prompts (Zipf popularity) with short distinct questions.
`token_scale` shrinks every length (e.g. 1/8) so the same shapes fit a CPU server; `output_scale`
(default: `token_scale`) shrinks only the generated lengths, as decoding is what is slow on CPU while
the prompt shapes decide routing. Pure, seeded.
"""

from __future__ import annotations

import functools
import hashlib
import json
import operator
import random
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class TraceRequest:
    arrival: float  # seconds from the start
    input_ids: list[int]
    output_len: int
    group: str  # conversation / session / system prompt it belongs to


@functools.lru_cache(maxsize=4)
def _ints(vocab: int) -> tuple[int, ...]:
    return tuple(range(vocab))


def _block(key: int | str, n: int, vocab: int, salt: str) -> list[int]:
    """`n` token ids fixed by (salt, key): the same block everywhere it is reused. numpy draws them
    (the full Mooncake trace has 183k distinct blocks, 94M tokens), and they are the same `vocab`
    int objects everywhere, not 94M separate ones (3 GB)."""
    seed = int.from_bytes(hashlib.blake2b(f"{salt}:{key}".encode(), digest_size=8).digest(), "little")
    ids = np.random.default_rng(seed).integers(3, vocab, n)
    return list(operator.itemgetter(*ids)(_ints(vocab))) if n > 1 else [_ints(vocab)[int(i)] for i in ids]


def _scaled(n: int, scale: float) -> int:
    return max(1, round(n * scale))


def mooncake(
    path: str | Path,
    fraction: float = 0.05,
    time_compression: float = 1.0,
    vocab: int = 2048,
    token_scale: float = 1.0,
    seed: int = 0,
    max_requests: int | None = None,
    output_scale: float | None = None,
    max_duration: float | None = None,
) -> list[TraceRequest]:
    """The trace's conversations kept by `crc32(f"{seed}:{key}") % 10000 < fraction * 10000`, with
    key = the second hash id (the conversation; the first is the shared system prompt).
    `max_duration` keeps the first seconds (after compression)."""
    out_scale = token_scale if output_scale is None else output_scale
    block = _scaled(512, token_scale)
    blocks: dict[int, list[int]] = {}
    out: list[TraceRequest] = []
    t0 = None
    with open(path) as fh:
        for line in fh:
            row = json.loads(line)
            h = row["hash_ids"]
            key = h[1] if len(h) > 1 else h[0]
            if zlib.crc32(f"{seed}:{key}".encode()) % 10000 >= fraction * 10000:
                continue
            ids: list[int] = []
            for hid in h:
                if hid not in blocks:
                    blocks[hid] = _block(hid, block, vocab, "mooncake")
                ids.extend(blocks[hid])
            ids = ids[: _scaled(row["input_length"], token_scale)]
            ts = row["timestamp"] / 1000.0
            t0 = ts if t0 is None else t0
            arrival = (ts - t0) / time_compression
            if max_duration is not None and arrival > max_duration:
                break
            out.append(TraceRequest(arrival, ids, _scaled(max(1, row["output_length"]), out_scale), str(key)))
            if max_requests is not None and len(out) >= max_requests:
                break
    return out


def agentic(
    sessions: int = 8,
    turns: int = 10,
    shared_prefix: int = 6912,
    task_len: int = 2400,
    append_mean: int = 2129,
    output_mean: int = 597,
    tool_time_mean: float = 4.2,
    session_rate: float = 0.5,
    vocab: int = 2048,
    token_scale: float = 1.0,
    seed: int = 0,
    output_scale: float | None = None,
) -> list[TraceRequest]:
    """Agent sessions starting as a Poisson process (`session_rate` per second)."""
    out_scale = token_scale if output_scale is None else output_scale
    rng = random.Random(seed)
    system = _block("system", _scaled(shared_prefix, token_scale), vocab, f"agentic{seed}")
    out: list[TraceRequest] = []
    start = 0.0
    for s in range(sessions):
        start += rng.expovariate(session_rate)
        history = system + _block(f"task{s}", _scaled(task_len, token_scale), vocab, f"agentic{seed}")
        t = start
        for k in range(turns):
            if k:
                reply = _block(f"reply{s}.{k}", _scaled(rng.expovariate(1 / output_mean), token_scale), vocab, "a")
                history = history + reply
                t += rng.expovariate(1 / tool_time_mean)
            appended = _block(f"tool{s}.{k}", _scaled(rng.expovariate(1 / append_mean), token_scale), vocab, "a")
            history = history + appended
            output = max(1, _scaled(rng.expovariate(1 / output_mean), out_scale))
            out.append(TraceRequest(t, list(history), output, f"session{s}"))
    out.sort(key=lambda r: r.arrival)
    return out


def api(
    requests: int = 200,
    system_prompts: int = 4,
    system_len: int = 3000,
    question_len: int = 100,
    output_len: int = 150,
    zipf: float = 1.0,
    rate: float = 2.0,
    vocab: int = 2048,
    token_scale: float = 1.0,
    seed: int = 0,
    output_scale: float | None = None,
) -> list[TraceRequest]:
    """Questions against a few long system prompts, popularity 1/rank**zipf, Poisson at `rate`."""
    out_scale = token_scale if output_scale is None else output_scale
    rng = random.Random(seed)
    prompts = [_block(f"sys{i}", _scaled(system_len, token_scale), vocab, f"api{seed}") for i in range(system_prompts)]
    weights = [1 / (i + 1) ** zipf for i in range(system_prompts)]
    out: list[TraceRequest] = []
    t = 0.0
    for _ in range(requests):
        p = rng.choices(range(system_prompts), weights)[0]
        q = [rng.randrange(3, vocab) for _ in range(_scaled(question_len, token_scale))]
        out.append(TraceRequest(t, prompts[p] + q, max(1, _scaled(output_len, out_scale)), f"system{p}"))
        t += rng.expovariate(rate)
    return out


def summary(reqs: Iterable[TraceRequest]) -> dict[str, float]:
    reqs = list(reqs)
    n = len(reqs)
    return {
        "requests": n,
        "duration_s": max((r.arrival for r in reqs), default=0.0),
        "input_mean": sum(len(r.input_ids) for r in reqs) / max(1, n),
        "output_mean": sum(r.output_len for r in reqs) / max(1, n),
        "groups": len({r.group for r in reqs}),
    }
