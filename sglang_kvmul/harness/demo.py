"""The main job: a real SGLang server with 2 DP ranks under kvmul, driven by `sglang.bench_serving`.

With no `--model-path` (or no GPU) it builds the tiny model and runs on CPU. It prints where each
shared-prefix group was placed, how much of each rank's prompt work came from cache, and TTFT.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from sglang_kvmul.harness.local_server import cpu_server_args, running_server
from sglang_kvmul.harness.tiny_model import build
from sglang_kvmul.launch.server import _cuda_available
from sglang_kvmul.serving.settings import KvmulSettings


def _bench_cmd(url_port: int, tokenizer: str, out: Path, a: argparse.Namespace) -> list[str]:
    return [
        sys.executable, "-m", "sglang.bench_serving",
        "--backend", "sglang", "--host", "127.0.0.1", "--port", str(url_port),
        "--dataset-name", "generated-shared-prefix",
        "--gsp-num-groups", str(a.groups), "--gsp-prompts-per-group", str(a.per_group),
        "--gsp-system-prompt-len", str(a.prefix_len), "--gsp-question-len", "32", "--gsp-output-len", "8",
        "--request-rate", str(a.request_rate), "--seed", "1",
        "--tokenizer", tokenizer, "--model", tokenizer,
        "--cache-report", "--output-details", "--output-file", str(out),
    ]  # fmt: skip


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def report(decisions: list[dict], bench: dict) -> str:
    """Per-rank placement from the controller's decisions, TTFT from bench_serving."""
    groups: dict[int, set] = defaultdict(set)
    reqs: dict[int, int] = defaultdict(int)
    prompt: dict[int, int] = defaultdict(int)
    cached: dict[int, int] = defaultdict(int)
    for d in decisions:
        r = d["rank"]
        reqs[r] += 1
        groups[r].add(d["prefix_fp"])
        prompt[r] += d["prompt_len"]
        cached[r] += d["predicted_cached"]
    split = list(groups.values())
    shared = set.intersection(*split) if len(split) > 1 else set()
    header = "rank  requests  prefix groups  cached share of prompt tokens"
    lines = ["", "Placement (kvmul controller decisions)", header]
    for r in sorted(reqs):
        lines.append(f"{r:>4}  {reqs[r]:>8}  {len(groups[r]):>13}  {cached[r] / max(1, prompt[r]):>28.2f}")
    lines.append(f"groups seen on more than one rank: {len(shared)}")
    ttfts = [t * 1000 for t in bench["ttfts"] if t]
    rows = list(zip(bench["ttfts"], bench["cached_tokens"], bench["input_lens"], strict=True))
    hit = [t * 1000 for t, c, n in rows if t and c >= n / 2]  # the shared prefix was reused
    miss = [t * 1000 for t, c, n in rows if t and c < n / 2]
    lines += [
        "",
        "TTFT (bench_serving, ms)",
        f"all         n={len(ttfts):>3}  mean {statistics.mean(ttfts):7.1f}  median {statistics.median(ttfts):7.1f}"
        f"  p99 {_pct(ttfts, 0.99):7.1f}",
    ]
    for name, xs in (("prefix hits", hit), ("misses", miss)):
        if xs:
            mean, median = statistics.mean(xs), statistics.median(xs)
            lines.append(f"{name:<11} n={len(xs):>3}  mean {mean:7.1f}  median {median:7.1f}")
    total_in = bench.get("total_input_tokens") or sum(bench["input_lens"])
    lines.append(f"cached share of all prompt tokens (SGLang-reported): {sum(bench['cached_tokens']) / total_in:.2f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model-path", default=None, help="a model to serve (default: the built-in tiny model on CPU)")
    ap.add_argument("--dp-size", type=int, default=2)
    ap.add_argument("--groups", type=int, default=6)
    ap.add_argument("--per-group", type=int, default=6)
    ap.add_argument("--prefix-len", type=int, default=512)
    ap.add_argument("--request-rate", type=float, default=2.0)
    ap.add_argument("--out-dir", type=Path, default=Path("runs/demo"))
    a = ap.parse_args()

    a.out_dir.mkdir(parents=True, exist_ok=True)
    on_gpu = a.model_path is not None and _cuda_available()
    model = a.model_path if on_gpu else str(build("tiny"))
    args = ["--dp-size", str(a.dp_size)] + ([] if on_gpu else cpu_server_args(16384))
    decision_log = a.out_dir / "decisions.jsonl"
    decision_log.unlink(missing_ok=True)
    bench_out = a.out_dir / "bench.jsonl"
    bench_out.unlink(missing_ok=True)
    print(f"[demo] starting SGLang (dp={a.dp_size}, kvmul, {'GPU' if on_gpu else 'CPU, tiny model'}) ...", flush=True)
    env = KvmulSettings(decision_log=str(decision_log)).to_env()
    with running_server(model, args, a.out_dir / "server.log", env=env) as server:
        print(f"[demo] server up at {server.url}; running sglang.bench_serving ...", flush=True)
        subprocess.run(_bench_cmd(server.port, model, bench_out, a), check=True)
    decisions = [json.loads(line) for line in decision_log.read_text().splitlines()]
    bench = json.loads(bench_out.read_text().splitlines()[-1])
    print(report([d for d in decisions if not d["pinned"]], bench))
    print(f"\n[demo] server log, decisions and bench output are in {a.out_dir}/")


if __name__ == "__main__":
    main()
