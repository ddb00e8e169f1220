"""`python -m sglang_kvmul.check --url http://HOST:PORT --metrics-url http://HOST:MPORT/metrics`:
the first thing to run on a new kvmul deployment (any shape: plain DP, attention DP, several nodes).

It sends a short, bounded shared-prefix probe, one request at a time, and checks per rank that
(1) every request of a prefix group stays on one rank after the first, and (2) the tokens the
controller predicted to be cached (`kvmul_predicted_hit_tokens_total`, read before and after) equal
the `cached_tokens` SGLang reported for that rank's requests. Sequential requests make both exact,
so any difference is a misconfiguration (events not reaching the controller, a wrong page size,
a stale rank). Before each request it waits until the controller sees no queued prefill, so the
cache alone decides. Exit status 0 when both hold, 1 otherwise (2: unreachable, or never quiet).
Run it before opening traffic: other requests during the probe change the metrics it compares.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import defaultdict
from collections.abc import Sequence

import requests

_PREDICTED = "kvmul_predicted_hit_tokens_total"
_QUEUED = "kvmul_queued_uncached_tokens"
QUIET_TIMEOUT_S = 30.0


def _per_rank(metrics_url: str, name: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in requests.get(metrics_url, timeout=10).text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line.rsplit(" ", 1)
            out[labels.split('rank="')[1].split('"')[0]] = float(value)
    return out


def _wait_quiet(metrics_url: str) -> None:
    """Until the controller sees no queued prefill anywhere (SGLang's idle load snapshot has
    arrived), so each probe request meets an idle cluster and only the cache decides."""
    deadline = time.monotonic() + QUIET_TIMEOUT_S
    while any(_per_rank(metrics_url, _QUEUED).values()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the controller still sees queued prefill after {QUIET_TIMEOUT_S:.0f} s")
        time.sleep(0.05)  # polling interval


def probe(
    url: str, metrics_url: str, groups: int = 6, per_group: int = 3, prefix_len: int = 256, seed: int = 0
) -> dict:
    """Run the probe; return per-rank findings and `ok`."""
    rng = random.Random(seed)
    tag = f"kvmul-check-{rng.randrange(1 << 30):x}"
    prefixes = [[rng.randrange(10, 1000) for _ in range(prefix_len)] for _ in range(groups)]
    before = _per_rank(metrics_url, _PREDICTED)
    placement: dict[int, list[int]] = defaultdict(list)
    reported: dict[str, int] = defaultdict(int)
    requests_per_rank: dict[str, int] = defaultdict(int)
    for rep in range(per_group):
        for g, prefix in enumerate(prefixes):
            body = {
                "rid": f"{tag}-{g}-{rep}",
                "input_ids": prefix + [rng.randrange(10, 1000) for _ in range(16)],
                "sampling_params": {"max_new_tokens": 1, "temperature": 0},
            }
            _wait_quiet(metrics_url)
            resp = requests.post(url + "/generate", json=body, timeout=120)
            resp.raise_for_status()
            meta = resp.json()["meta_info"]
            rank = meta.get("dp_rank")
            placement[g].append(rank)
            reported[str(rank)] += int(meta.get("cached_tokens", 0))
            requests_per_rank[str(rank)] += 1
    after = _per_rank(metrics_url, _PREDICTED)
    ranks = sorted(set(after) | set(reported), key=lambda r: int(r) if r.isdigit() else -1)
    per_rank = []
    for r in ranks:
        predicted = after.get(r, 0.0) - before.get(r, 0.0)
        got = reported.get(r, 0)
        per_rank.append({"rank": r, "requests": requests_per_rank.get(r, 0), "predicted_cached": int(predicted),
                         "reported_cached": got, "exact": int(predicted) == got})  # fmt: skip
    sticky = {g: len(set(seen)) == 1 for g, seen in placement.items()}
    ok = all(sticky.values()) and all(p["exact"] for p in per_rank) and sum(reported.values()) > 0
    return {"ok": ok, "per_rank": per_rank, "groups_sticky": sum(sticky.values()), "groups": groups}


def report(result: dict) -> str:
    lines = ["rank  requests  predicted cached  reported cached  exact"]
    for p in result["per_rank"]:
        lines.append(f"{p['rank']:>4}  {p['requests']:>8}  {p['predicted_cached']:>16}  {p['reported_cached']:>15}  "
                     f"{'yes' if p['exact'] else 'NO'}")  # fmt: skip
    lines.append(f"prefix groups kept on one rank: {result['groups_sticky']} of {result['groups']}")
    lines.append("OK" if result["ok"] else "FAILED: see the rows above (launch/PRODUCTION.md says what each means)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:30000")
    ap.add_argument("--metrics-url", required=True, help="the controller's metrics (--kvmul-metrics-port)")
    ap.add_argument("--groups", type=int, default=6)
    ap.add_argument("--per-group", type=int, default=3)
    ap.add_argument("--prefix-len", type=int, default=256)
    a = ap.parse_args(argv)
    try:
        result = probe(a.url.rstrip("/"), a.metrics_url, a.groups, a.per_group, a.prefix_len)
    except (requests.RequestException, TimeoutError) as exc:
        print(f"kvmul check: cannot reach the server: {exc}", file=sys.stderr)
        return 2
    print(report(result))
    return 0 if result["ok"] else 1
