"""Routing policies on a real CPU SGLang server, replayed with SGLang's own bench_serving.

Every configuration serves the same two DP ranks of the built-in `bench` model (dummy weights):
  * our controller with each rule on the same exact mirror and load view (`--kvmul-policy`):
    kvmul, cache_only, load_only, vllm_v1, dynamo, sglang_cache_aware, linear:<alpha> (the sweep);
  * SGLang's own DP methods as they are: round_robin, total_requests, total_tokens;
  * the real SGLang gateway (PyPI `sglang-router`, policy cache_aware, its default thresholds) in
    front of two dp=1 SGLang servers, one core each.
Workloads (sglang_kvmul.sim.workloads, shrunk by `token_scale` to fit two CPU cores): the real
Mooncake conversation trace, agentic sessions shaped by TraceLab, API system prompts (short and
long outputs).
Each configuration starts once, is warmed up (one request per rank, then the cache is flushed;
with `--warm-measure` also run until our controller has measured the decode cost, `warm_measure`),
and replays the workloads in turn with a cache flush between them. All DP-controller runs use the
same blocking controller loop (`KvmulSettings.poll_all_methods`; stock 0.5.23 spins a core).
Per-rank request split: SGLang's own per-rank `queue_time_seconds` counts (`--enable-metrics`);
per-rank load over time: `/v1/loads` sampled every `--sample-s` seconds.

Writes benchmarks/results/<workload>/: raw/<config>.jsonl (bench_serving's line with
per-request details), raw/<config>.loads.jsonl, summary.json, table.md, ttft_cdf.png,
tpot_cdf.png, rank_load.png, alpha_sweep.png; and benchmarks/results/policy_comparison.md.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests
from tqdm import tqdm

from benchmarks.bench_serving_replay import replay, write_trace
from benchmarks.common import DEFAULT_TRACE, RESULTS, add_trace_arg, pyplot, stats, trace_path
from sglang_kvmul.core.rules import DEFAULT_RULE
from sglang_kvmul.core.score import kvmul_scores
from sglang_kvmul.harness.local_server import LocalServer, cpu_server_args, start_server
from sglang_kvmul.harness.tiny_model import VOCAB, build
from sglang_kvmul.launch.ports import free_port_range
from sglang_kvmul.serving.settings import KvmulSettings
from sglang_kvmul.sim import workloads

TRACE = DEFAULT_TRACE  # main() sets the --trace argument
OWN_FLAGS = ("render", "append")  # how this invocation ran, not what it measured
FEATURED = DEFAULT_RULE  # the verdict is about the default rule
RULES = tuple(  # the default; marginal_chunked, marginal_turnover, ... marginal_bounded: earlier defaults
    dict.fromkeys(
        (
            FEATURED,
            "marginal_room_timed",
            "marginal_shared",
            "marginal_behind",
            "marginal_behind_held",
            "marginal_room",
            "marginal_chunked",
            "marginal_timed",
            "marginal_turnover",
            "marginal_rebalance",
            "marginal_bounded",
            "kvmul",
            "cache_only",
            "load_only",
            "vllm_v1",
            "dynamo",
            "sglang_cache_aware",
        )
    )
)
STOCK = ("round_robin", "total_requests", "total_tokens")
GATEWAY = "gateway_cache_aware"
LOGGED = ("decode_tokens_per_request", "trips_shared_stem", "trips_room_priced")  # progress lines show these
HEADLINE = ("round_robin", "total_requests", GATEWAY)  # the "kvmul must beat" set

WORKLOADS: dict[str, Callable[[float], list[workloads.TraceRequest]]] = {
    # 0.6% of the conversations (whole ones), the hour compressed 150x: ~70 requests in ~23 s
    "mooncake": lambda s: workloads.mooncake(
        trace_path(TRACE), fraction=0.006, time_compression=150, token_scale=s / 2, output_scale=s / 4, vocab=VOCAB
    ),
    # 6 sessions x 8 turns, 1.5 s tool pauses; histories grow to ~2.5k tokens
    "agentic": lambda s: workloads.agentic(
        sessions=6, turns=8, tool_time_mean=1.5, session_rate=0.6, token_scale=s, output_scale=s / 8, vocab=VOCAB
    ),
    # KV pressure at about agentic's offered load (~2.4k prompt tokens/s): 12 sessions x 8 turns, 4 s
    # tool pauses; the live histories peak at ~20k tokens, above both ranks' pools together (2 x 8000)
    "agentic_kv": lambda s: workloads.agentic(
        sessions=12, turns=8, tool_time_mean=4.0, session_rate=0.5, token_scale=s, output_scale=s / 8, vocab=VOCAB
    ),
    # the same sessions with outputs 8x longer (~37 tokens): enough decode steps for the controller to
    # measure L, one output's duration, which marginal_room's wait for KV room needs
    "agentic_kv_long": lambda s: workloads.agentic(
        sessions=12, turns=8, tool_time_mean=4.0, session_rate=0.5, token_scale=s, output_scale=s, vocab=VOCAB
    ),
    # 12 system prompts of ~375 tokens (Zipf), 3 questions per second, 60 questions
    "api": lambda s: workloads.api(
        requests=60, system_prompts=12, rate=3.0, token_scale=2 * s, output_scale=s / 2, vocab=VOCAB
    ),
    # the same system prompts, 120 questions at 1 per second with outputs 8x longer (~38 tokens), about
    # the CPU server's decode capacity (4/s ran 3x over it): every pool has room for every prompt, and
    # the decode steps let the controller measure D, so marginal_shared's stem term prices the
    # decisions (a question's cached prefix is its system prompt, a shared stem)
    "api_long": lambda s: workloads.api(
        requests=120, system_prompts=12, rate=1.0, token_scale=2 * s, output_scale=4 * s, vocab=VOCAB
    ),
}  # fmt: skip


@dataclass
class Config:
    name: str
    kind: str  # "dp": one dp=2 server; "gateway": sglang-router + two dp=1 servers
    args: list[str] = field(default_factory=list)


def configs(alphas: list[float]) -> list[Config]:
    rules = [*RULES, *(f"linear:{a:g}" for a in alphas)]
    out = [Config(r, "dp", ["--load-balance-method", "kvmul", "--kvmul-policy", r]) for r in rules]
    out += [Config(m, "dp", ["--load-balance-method", m]) for m in STOCK]
    out.append(Config(GATEWAY, "gateway"))
    return out


# ---- servers -------------------------------------------------------------------------------------
@dataclass
class Deployment:
    url: str  # where clients send requests
    workers: list[LocalServer]  # the SGLang servers behind it (one dp=2, or two dp=1)
    decision_log: Path | None = None  # our controller's one line per decision (kvmul configs)
    metrics_url: str | None = None  # our controller's Prometheus endpoint (kvmul configs)


@contextmanager
def deploy(cfg: Config, model: Path, pool: int, work: Path) -> Iterator[Deployment]:
    common = ["--enable-metrics", *cpu_server_args(pool)]
    with ExitStack() as stack:
        if cfg.kind == "dp":
            ours = "kvmul" in cfg.args  # our controller: log its decisions and serve its gauges
            log = work / f"{_slug(cfg.name)}.decisions.jsonl" if ours else None
            port = free_port_range(1) if ours else None
            if log:
                log.unlink(missing_ok=True)
            settings = KvmulSettings(poll_all_methods=True, decision_log=log and str(log), metrics_port=port)
            srv = start_server(
                model, ["--dp-size", "2", *cfg.args, *common], work / f"{_slug(cfg.name)}.log", env=settings.to_env()
            )
            stack.callback(srv.stop)
            yield Deployment(srv.url, [srv], log, port and f"http://127.0.0.1:{port}/metrics")
            return
        workers = []
        for core in (0, 1):
            env = {"SGLANG_CPU_OMP_THREADS_BIND": str(core)}
            w = start_server(model, common, work / f"gateway-worker{core}.log", env=env)
            stack.callback(w.stop)
            workers.append(w)
        urls = " ".join(w.url for w in workers)
        router = (
            f"exec {shlex.quote(sys.executable)} -m sglang_router.launch_router --host 127.0.0.1 --port $PORT "
            f"--policy cache_aware --worker-urls {urls} --log-level warn"
        )
        gw = start_server(model, [], work / "gateway.log", command=["bash", "-c", router])
        stack.callback(gw.stop)
        yield Deployment(gw.url, workers)


def cold_requests(
    dep: Deployment, rng: np.random.Generator, prompt_len: int, outputs: Sequence[int]
) -> list[tuple[str, dict]]:
    """Per rank, one unrelated random prompt per output length: (server URL, /generate body), the rank
    pinned where one server holds them all."""
    out = []
    for w in dep.workers:
        for rank in range(len(w_ranks(w))):
            for n in outputs:
                body = {
                    "input_ids": rng.integers(3, VOCAB, prompt_len).tolist(),
                    "sampling_params": {"max_new_tokens": n, "temperature": 0, "ignore_eos": True},
                }
                if len(dep.workers) == 1:
                    body["routed_dp_rank"] = rank
                out.append((w.url, body))
    return out


def warm_up(dep: Deployment, prompt_len: int) -> None:
    """First-call costs on every rank, then empty caches (unrelated random prompts)."""
    for url, body in cold_requests(dep, np.random.default_rng(12345), prompt_len, (4,)):
        requests.post(url + "/generate", json=body, timeout=300).raise_for_status()
    flush(dep)


def warm_measure(dep: Deployment, prompt_len: int = 1100, outputs: tuple[int, ...] = (48, 96, 144, 192)) -> None:
    """Run each rank long enough for the controller to measure its decode cost, then empty the caches.

    The controller measures D and L (`core.decode_cost`) from a server's start, and only once the
    ranks have prefilled MIN_TOKENS_FOR_SPEED tokens and run MIN_DECODE_STEPS_FOR_SLOPE decode steps
    (pooled). A production server passed that long ago; a replay of a hundred short requests on a CPU
    server may never reach it, and then every rule that prices decodes decides as if they cost
    nothing. Two waves per rank of len(outputs) cold prompts sent together, their outputs of
    different lengths so the batch shrinks step by step (a slope needs batch sizes that differ);
    each wave stays within a 8000-token pool. Every configuration gets it, ours or not. The figures
    are cumulative, so these outputs (up to 192 tokens) weigh in: on `api_long` (38-token outputs) D
    read 498-681 prefill tokens a request when the replay began and 155-186 at its end."""
    rng = np.random.default_rng(54321)
    for _wave in range(2):
        wave = cold_requests(dep, rng, prompt_len, outputs)
        with ThreadPoolExecutor(len(wave)) as pool:  # sent together: a wave is the batches
            for resp in pool.map(lambda req: requests.post(req[0] + "/generate", json=req[1], timeout=600), wave):
                resp.raise_for_status()
    flush(dep)


def w_ranks(w: LocalServer) -> list[dict]:
    return requests.get(w.url + "/v1/loads", params={"include": "core"}, timeout=10).json()["loads"]


def flush(dep: Deployment) -> None:
    for w in dep.workers:
        requests.post(w.url + "/flush_cache", timeout=60).raise_for_status()
        assert all(ld["num_used_tokens"] == 0 for ld in w_ranks(w)), "cache not empty after flush"


_COUNT = re.compile(r"^sglang:queue_time_seconds_count\{(?P<labels>[^}]*)\} (?P<v>[0-9.e+]+)$", re.M)


def requests_per_rank(dep: Deployment) -> list[float]:
    """SGLang's own per-rank scheduled-request counters (cumulative)."""
    out: list[float] = []
    for w in dep.workers:
        per: dict[int, float] = {}
        for m in _COUNT.finditer(requests.get(w.url + "/metrics", timeout=10).text):
            rank = re.search(r'dp_rank="(\d+)"', m["labels"])
            per[int(rank[1]) if rank else 0] = per.get(int(rank[1]) if rank else 0, 0.0) + float(m["v"])
        out += [per.get(r, 0.0) for r in range(len(w_ranks(w)))]
    return out


_GAUGE = re.compile(r"^kvmul_(decode_\w+|prefill_chunk_tokens) (?P<v>[0-9.e+-]+)$", re.M)
_TRIPS = re.compile(r'^kvmul_rule_trips_total\{trip="(\w+)"\} (?P<v>[0-9.e+-]+)$', re.M)


def controller_gauges(dep: Deployment) -> dict[str, float]:
    """Our controller's measured decode-cost figures at the end of a replay (what the marginal rules
    priced with): empty for SGLang's own methods and the gateway."""
    if not dep.metrics_url:
        return {}
    text = requests.get(dep.metrics_url, timeout=10).text
    out = {m[1]: float(m["v"]) for m in _GAUGE.finditer(text)}
    return out | {f"trips_{m[1]}": float(m["v"]) for m in _TRIPS.finditer(text)}  # since the server started


def against_product(decisions: list[dict]) -> dict[str, float]:
    """Each routed decision next to the one the plain product would have made on the same view (the
    logged queues, cached prefixes and batches): how often they agree, and what each pick would
    have cost in uncached (prefill) tokens, queue ahead and batch joined. Sums, so repetitions pool."""
    out = dict.fromkeys(("decisions", "same", "uncached", "uncached_product", "queued", "queued_product",
                         "batch", "batch_product"), 0.0)  # fmt: skip
    for d in decisions:
        if d["pinned"]:
            continue
        uncached = [d["prompt_len"] - c for c in d["cached"]]
        scores = kvmul_scores(d["queued"], uncached, d["batch"])
        lowest = min(scores)
        product = d["rank"] if scores[d["rank"]] == lowest else scores.index(lowest)
        out["decisions"] += 1
        out["same"] += product == d["rank"]
        for key, values in (("uncached", uncached), ("queued", d["queued"]), ("batch", d["batch"])):
            out[key] += values[d["rank"]]
            out[f"{key}_product"] += values[product]
    return out


def _lines(path: Path | None) -> int:
    return len(path.read_text().splitlines()) if path and path.exists() else 0


class LoadSampler(threading.Thread):
    """Polls every worker's /v1/loads: (t, global rank, running, waiting, waiting uncached tokens)."""

    def __init__(self, dep: Deployment, period: float) -> None:
        super().__init__(daemon=True)
        self.dep, self.period, self.rows, self.done = dep, period, [], threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        while not self.done.wait(self.period):
            base = 0
            for w in self.dep.workers:
                try:
                    loads = w_ranks(w)
                except requests.RequestException:
                    continue
                for ld in loads:
                    self.rows.append(
                        [round(time.monotonic() - t0, 3), base + ld["dp_rank"], ld["num_running_reqs"],
                         ld["num_waiting_reqs"], ld["num_waiting_uncached_tokens"]]
                    )  # fmt: skip
                base += len(loads)

    def stop(self) -> list[list[float]]:
        self.done.set()
        self.join()
        return self.rows


# ---- one run -------------------------------------------------------------------------------------
def run_workload(
    dep: Deployment, cfg: Config, wl: str, trace: Path, model: Path, out: Path, sample_s: float, rep: int
) -> dict:
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    bench_file = raw / f"{_slug(cfg.name)}.r{rep}.jsonl"
    bench_file.unlink(missing_ok=True)
    before = requests_per_rank(dep)
    gauges_before = controller_gauges(dep)  # the rule's trips count from the server's start
    seen = _lines(dep.decision_log)
    sampler = LoadSampler(dep, sample_s)
    sampler.start()
    try:
        res = replay(dep.url, trace, bench_file, str(model))
    finally:
        loads = sampler.stop()
    split = [a - b for a, b in zip(requests_per_rank(dep), before, strict=True)]
    with open(raw / f"{_slug(cfg.name)}.r{rep}.loads.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in loads)
    decisions: list[dict] = []
    if dep.decision_log:  # this workload's decisions (the warm-up and earlier workloads' are before `seen`)
        lines = dep.decision_log.read_text().splitlines()[seen:]
        (raw / f"{_slug(cfg.name)}.r{rep}.decisions.jsonl").write_text("".join(d + "\n" for d in lines))
        decisions = [json.loads(d) for d in lines]
    flush(dep)
    ttft = [x * 1000 for x, e in zip(res["ttfts"], res["errors"], strict=True) if not e]
    tpot = [(sum(itl) * 1000 / len(itl)) for itl, e in zip(res["itls"], res["errors"], strict=True) if itl and not e]
    cr = res["cache_report"]
    return {
        "config": cfg.name,
        "rep": rep,
        "workload": wl,
        "completed": res["completed"],
        "errors": sum(1 for e in res["errors"] if e),
        "ttft_ms": stats(ttft),
        "tpot_ms": stats(tpot),
        "request_throughput": res["request_throughput"],
        "output_throughput": res["output_throughput"],
        "duration_s": res["duration"],
        "cached_tokens": cr["total_cached_tokens"],
        "prompt_tokens": cr["total_prompt_tokens"],
        "hit_ratio": cr["total_cached_tokens"] / max(1, cr["total_prompt_tokens"]),
        "requests_per_rank": split,
        "controller": {
            k: v - gauges_before.get(k, 0.0) if k.startswith("trips_") else v for k, v in controller_gauges(dep).items()
        },
        "controller_at_start": {k: v for k, v in gauges_before.items() if not k.startswith("trips_")},
        "against_product": against_product(decisions),
        "ttft_samples": ttft,
        "tpot_samples": tpot,
        "loads": loads,
    }


def _slug(name: str) -> str:
    return name.replace(":", "_")


# ---- reporting -----------------------------------------------------------------------------------
def table(runs: list[dict]) -> str:
    best = min(r["ttft_ms"]["mean"] for r in runs)
    lines = [
        "| policy | TTFT mean ms | P50 | P99 | TPOT mean ms | P50 | P99 | req/s | out tok/s | cached tokens | "
        "hit ratio | requests per rank | errors | mean TTFT per rep |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(runs, key=lambda r: r["ttft_ms"]["mean"]):
        t, p = r["ttft_ms"], r["tpot_ms"]
        mark = " **(best)**" if t["mean"] == best else ""
        split = "/".join(str(round(x)) for x in r["requests_per_rank"])
        lines.append(
            f"| {r['config']}{mark} | {t['mean']:.0f} | {t['p50']:.0f} | {t['p99']:.0f} | {p['mean']:.0f} | "
            f"{p['p50']:.0f} | {p['p99']:.0f} | {r['request_throughput']:.2f} | {r['output_throughput']:.1f} | "
            f"{r['cached_tokens']} | {r['hit_ratio']:.3f} | {split} | "
            f"{r['errors']} | {' / '.join(f'{x:.0f}' for x in r['rep_mean_ttft_ms'])} |"
        )
    return "\n".join(lines) + "\n"


def verdict(runs: list[dict], rule: str = FEATURED) -> dict:
    """`rule` against the headline set and the best linear alpha, on mean TTFT (and TPOT)."""
    by = {r["config"]: r["ttft_ms"]["mean"] for r in runs}
    tpot = {r["config"]: r["tpot_ms"]["mean"] for r in runs}
    k = by[rule]
    sweep = {c: v for c, v in by.items() if c.startswith("linear:")}
    best_alpha = min(sweep, key=sweep.get) if sweep else None
    return {
        "rule": rule,
        "mean_ttft_ms": k,
        "ratios": {c: k / by[c] for c in HEADLINE if c in by},
        "beats": {c: k < by[c] for c in HEADLINE if c in by},
        "best_alpha": best_alpha,
        "over_best_alpha": k / sweep[best_alpha] if best_alpha else None,
        "within_10pct_of_best_alpha": (k <= 1.10 * sweep[best_alpha]) if best_alpha else None,
        "tpot_over_best_alpha": tpot[rule] / min(tpot[c] for c in sweep) if sweep else None,
        "kvmul_over_rule": by["kvmul"] / k if "kvmul" in by else None,
    }


def plot(runs: list[dict], out: Path, wl: str) -> None:
    plt = pyplot()

    names = [r["config"] for r in runs]
    style = {n: ("-" if n in (FEATURED, "kvmul", *HEADLINE) else ":") for n in names}
    for metric, fname in (("ttft_samples", "ttft_cdf.png"), ("tpot_samples", "tpot_cdf.png")):
        fig, ax = plt.subplots(figsize=(8, 5))
        for r in runs:
            xs = np.sort(r[metric])
            if len(xs):
                lw = 2.5 if r["config"] == FEATURED else 1.2
                ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), style[r["config"]], lw=lw, label=r["config"])
        ax.set_xscale("log")
        ax.set_xlabel(f"{metric.split('_')[0].upper()} (ms)")
        ax.set_ylabel("CDF")
        ax.set_title(f"{wl}: {metric.split('_')[0].upper()} per policy")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=100)
        plt.close(fig)

    shown = [r for r in runs if r["config"] in (FEATURED, "kvmul", *HEADLINE)]
    fig, axes = plt.subplots(len(shown), 1, figsize=(9, 2.2 * len(shown)), sharex=True, squeeze=False)
    for ax, r in zip(axes[:, 0], shown, strict=True):
        rows = np.asarray(r["loads"]) if r["loads"] else np.zeros((0, 5))
        for rank in sorted({int(x) for x in rows[:, 1]}) if len(rows) else []:
            sel = rows[rows[:, 1] == rank]
            ax.plot(sel[:, 0], sel[:, 2] + sel[:, 3], label=f"rank {rank}")
        ax.set_ylabel("running+waiting")
        ax.set_title(r["config"], fontsize=9)
        ax.legend(fontsize=7)
    axes[-1, 0].set_xlabel("seconds into the replay")
    fig.tight_layout()
    fig.savefig(out / "rank_load.png", dpi=100)
    plt.close(fig)

    lin = [r for r in runs if r["config"].startswith("linear:")]
    sweep = sorted((float(r["config"].split(":")[1]), r["ttft_ms"]["mean"]) for r in lin)
    if sweep:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([a for a, _ in sweep], [m for _, m in sweep], "o-", label="linear alpha sweep")
        for name, ls in ((FEATURED, "-"), ("kvmul", "-."), ("round_robin", "--"), (GATEWAY, ":")):
            hit = [r for r in runs if r["config"] == name]
            if hit:
                ax.axhline(hit[0]["ttft_ms"]["mean"], ls=ls, color="k" if name == FEATURED else None, label=name)
        ax.set_xlabel("alpha (weight on uncached tokens)")
        ax.set_ylabel("mean TTFT (ms)")
        ax.set_title(f"{wl}: linear alpha sweep")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "alpha_sweep.png", dpi=100)
        plt.close(fig)


def pool(reps: list[dict]) -> list[dict]:
    """One entry per configuration over all its repetitions (samples and token counts pooled)."""
    by: dict[str, list[dict]] = {}
    for r in reps:
        by.setdefault(r["config"], []).append(r)
    out = []
    for name, rs in by.items():
        ttft = [x for r in rs for x in r["ttft_samples"]]
        tpot = [x for r in rs for x in r["tpot_samples"]]
        cached, prompt = sum(r["cached_tokens"] for r in rs), sum(r["prompt_tokens"] for r in rs)
        out.append({
            "config": name, "reps": len(rs), "rep_mean_ttft_ms": [r["ttft_ms"]["mean"] for r in rs],
            "completed": sum(r["completed"] for r in rs), "errors": sum(r["errors"] for r in rs),
            "ttft_ms": stats(ttft), "tpot_ms": stats(tpot),
            "request_throughput": float(np.mean([r["request_throughput"] for r in rs])),
            "output_throughput": float(np.mean([r["output_throughput"] for r in rs])),
            "cached_tokens": cached, "prompt_tokens": prompt, "hit_ratio": cached / max(1, prompt),
            "requests_per_rank": [sum(x) for x in zip(*(r["requests_per_rank"] for r in rs), strict=True)],
            "ttft_samples": ttft, "tpot_samples": tpot, "loads": rs[0].get("loads", []),
            "against_product": _summed([r.get("against_product") or {} for r in rs]),
            "controller": [r.get("controller") or {} for r in rs],
        })  # fmt: skip
    return out


def _summed(parts: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for p in parts for k in p}
    return {k: sum(p.get(k, 0.0) for p in parts) for k in sorted(keys)}


def decisions_table(runs: list[dict]) -> str:
    """Our controller's rules, decision by decision, against the product on the same view, with the
    decode-cost figures the marginal rules priced with (SGLang's measurements, as the controller
    pooled them at the end of each repetition)."""
    rows = [r for r in runs if r["against_product"].get("decisions")]
    if not rows:
        return ""
    lines = [
        "Our controller's decisions against the plain product's on the same view (the logged queues, cached "
        "prefixes and batches; mean per decision):\n",
        "| rule | decisions | same rank as the product | uncached tokens (product's pick) | queued tokens "
        "(product's) | batch joined (product's) | D, prefill tokens per request in a batch | L, one output "
        "in prefill tokens | room wait priced / spared (timed / speed changed the rank), per repetition |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r["ttft_ms"]["mean"]):
        a, n = r["against_product"], r["against_product"]["decisions"]
        ctl = r["controller"]
        d = " / ".join(f"{c.get('decode_tokens_per_request', 0):.0f}" for c in ctl)
        big_l = " / ".join(f"{c.get('decode_output_tokens', 0):.0f}" for c in ctl)
        room = "; ".join(
            f"{c['trips_room_priced']:.0f} / {c['trips_room_exempt']:.0f}"
            + (f" ({c.get('trips_timed', 0):.0f} / {c.get('trips_speed_spread', 0):.0f})" if "trips_timed" in c else "")
            for c in ctl
            if "trips_room_priced" in c
        )
        lines.append(
            f"| {r['config']} | {n:.0f} | {a['same'] / n:.0%} | {a['uncached'] / n:.0f} "
            f"({a['uncached_product'] / n:.0f}) | {a['queued'] / n:.0f} ({a['queued_product'] / n:.0f}) | "
            f"{a['batch'] / n:.1f} ({a['batch_product'] / n:.1f}) | {d} | {big_l} | {room} |"
        )
    return "\n".join(lines) + "\n"


def write_workload(name: str, wl: str, reps: list[dict], config: dict) -> dict:
    """results/<name>/ for workload `wl`: summary.json, table.md and the plots."""
    out = RESULTS / name
    out.mkdir(parents=True, exist_ok=True)
    runs = pool(reps)
    v = verdict(runs, FEATURED if any(r["config"] == FEATURED for r in runs) else "kvmul")
    doc = {"workload": wl, "config": config, "verdict": v, "reps": reps}
    (out / "summary.json").write_text(json.dumps(doc, indent=1))
    n = max(r["reps"] for r in runs)
    md = f"# {name}\n\nWorkload: `{json.dumps(config['workloads'][wl])}`\n\n"
    md += f"Pooled over {n} repetition(s) per policy; per-repetition mean TTFT in the last column.\n\n"
    md += table(runs) + "\n" + _verdict_line(v) + "\n"
    if extra := decisions_table(runs):
        md += "\n" + extra
    (out / "table.md").write_text(md)
    plot(runs, out, name)
    return v


def _f(x: float | None, fmt: str = ".2f") -> str:
    return "n/a" if x is None else format(x, fmt)


def _verdict_line(v: dict) -> str:
    rule = v.get("rule", "kvmul")
    parts = [f"{rule}/{c} mean TTFT {x:.2f}" for c, x in v["ratios"].items()]
    if v["best_alpha"]:
        parts.append(f"{rule}/{v['best_alpha']} (best alpha) {_f(v.get('over_best_alpha'))}")
        parts.append(f"TPOT / best alpha's {_f(v.get('tpot_over_best_alpha'))}")
    if v.get("kvmul_over_rule") is not None and rule != "kvmul":
        parts.append(f"plain kvmul / {rule} mean TTFT {_f(v['kvmul_over_rule'])}")
    return "; ".join(parts)


def write_overview() -> None:
    """One row per saved result set (every workload, and every labelled run of one), each from its
    own summary.json: a partial invocation does not drop the others' rows."""
    lines = [
        "# policy_comparison", "", __doc__.strip(), "",
        "| workload | token scale | reps | rule | mean TTFT ms | / round_robin | / total_requests | / gateway | "
        "best alpha | / best alpha | TPOT / best alpha's | plain kvmul / rule | done-when met |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for path in sorted(RESULTS.glob("*/summary.json")):
        doc = json.loads(path.read_text())
        if "verdict" not in doc:  # another benchmark's summary
            continue
        name, v, run = path.parent.name, doc["verdict"], doc["config"]["run"]
        r = v["ratios"]
        met = all(v["beats"].values()) and bool(v["within_10pct_of_best_alpha"])
        lines.append(
            f"| [{name}]({name}/table.md) | {run['token_scale']:g} | {1 + max(x['rep'] for x in doc['reps'])} | "
            f"{v['rule']} | {v['mean_ttft_ms']:.0f} | {_f(r.get('round_robin'))} | "
            f"{_f(r.get('total_requests'))} | {_f(r.get(GATEWAY))} | {v['best_alpha']} | "
            f"{_f(v['over_best_alpha'])} | {_f(v['tpot_over_best_alpha'])} | {_f(v['kvmul_over_rule'])} | "
            f"{'yes' if met else 'no'} |"
        )
    lines.append(f"\nRatios below 1 mean the rule is faster; the rule is the default ({FEATURED}) where that")
    lines.append("workload was run with it, else kvmul. Done-when: faster than round_robin, total_requests and")
    lines.append("the gateway, and within 10% of the best linear alpha. Each set's exact configuration is in its")
    lines.append("summary.json (`config.run`).")
    (RESULTS / "policy_comparison.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


# ---- main ----------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_trace_arg(ap)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--configs", default=None, help="comma-separated subset of configuration names")
    ap.add_argument("--alphas", default="0.25,0.5,0.75", help="linear sweep (weight on uncached tokens)")
    ap.add_argument("--token-scale", type=float, default=1 / 16, help="every length times this (CPU fit)")
    ap.add_argument("--pool", type=int, default=8000, help="KV-pool tokens per rank")
    ap.add_argument("--sample-s", type=float, default=0.5, help="per-rank load sampling period")
    ap.add_argument("--model", default="bench", help="built-in model shape (tiny_model.SHAPES)")
    ap.add_argument("--reps", type=int, default=1, help="repetitions (order reversed on odd ones)")
    ap.add_argument(
        "--warm-measure", action="store_true", help="before the workloads, run each rank until D is measured"
    )
    ap.add_argument("--append", action="store_true", help="add these repetitions to the saved results")
    ap.add_argument("--render", action="store_true", help="only redraw tables/plots from saved summaries")
    ap.add_argument(
        "--label", default="", help="save to results/<workload>-<label>/ (a variant, e.g. another --token-scale)"
    )
    args = ap.parse_args()
    global TRACE
    TRACE = args.trace
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: servers are stopped on the way out
    wls = args.workloads.split(",")
    dirs = {wl: f"{wl}-{args.label}" if args.label else wl for wl in wls}
    if args.render:
        return _render(list(dirs.values()))
    cfgs = configs([float(a) for a in args.alphas.split(",")])
    if args.configs:
        keep = set(args.configs.split(","))
        if unknown := keep - {c.name for c in cfgs}:
            ap.error(f"unknown --configs {sorted(unknown)}; choose from {', '.join(c.name for c in cfgs)}")
        cfgs = [c for c in cfgs if c.name in keep]
    model = build(args.model)
    work = RESULTS / "policy_comparison.work"
    work.mkdir(parents=True, exist_ok=True)
    traces = {}
    for wl in wls:
        reqs = WORKLOADS[wl](args.token_scale)
        traces[wl] = work / f"{wl}.trace.jsonl"
        write_trace(reqs, traces[wl])
        tqdm.write(f"{wl}: {workloads.summary(reqs)}")
    config = {
        "run": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in OWN_FLAGS},
        "workloads": {wl: workloads.summary(WORKLOADS[wl](args.token_scale)) for wl in wls},
    }
    runs: dict[str, list[dict]] = {wl: [] for wl in wls}
    first = 0
    if args.append:
        for wl in wls:
            runs[wl] = json.loads((RESULTS / dirs[wl] / "summary.json").read_text())["reps"]
        first = 1 + max(r["rep"] for wl in wls for r in runs[wl])
    t0 = time.time()
    bar = tqdm(total=args.reps * len(cfgs) * len(wls), desc="policy comparison", unit="run")
    for rep in range(first, first + args.reps):
        for cfg in cfgs if rep % 2 == 0 else cfgs[::-1]:
            with deploy(cfg, model, args.pool, work) as dep:
                warm_up(dep, 256)
                if args.warm_measure:
                    warm_measure(dep)
                for wl in wls:
                    bar.set_postfix_str(f"rep {rep}: {cfg.name} / {wl}")
                    r = run_workload(dep, cfg, wl, traces[wl], model, RESULTS / dirs[wl], args.sample_s, rep)
                    runs[wl].append(r)
                    tqdm.write(
                        f"{cfg.name:>20} {wl:>8}: TTFT mean {r['ttft_ms']['mean']:.0f} ms, "
                        f"P99 {r['ttft_ms']['p99']:.0f}, hit {r['hit_ratio']:.3f}, "
                        f"split {[round(x) for x in r['requests_per_rank']]}"
                        + "".join(f", {k} {v:.0f}" for k, v in r["controller"].items() if k in LOGGED)
                    )
                    bar.update(1)
    bar.close()
    config["run"]["wall_s_last_invocation"] = round(time.time() - t0)
    for wl in wls:
        write_workload(dirs[wl], wl, runs[wl], config)
    write_overview()


def _render(names: list[str]) -> None:
    for name in names:
        doc = json.loads((RESULTS / name / "summary.json").read_text())
        write_workload(name, doc.get("workload") or name.split("-")[0], doc["reps"], doc["config"])
    write_overview()


if __name__ == "__main__":
    main()
