"""Routing rules over one shared per-rank view: kvmul and the baselines it is compared with.

Every rule sees the same exact cache figures (from the mirror) and the same load ledger, so a
comparison measures the rule, not the quality of its inputs. Pure functions, shared with the
simulator. Each returns (rank, tie) where `tie` says the rotation decided among equals.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sglang_kvmul.guard import GuardedKvmul
from sglang_kvmul.policy import kvmul_scores, pick_lowest


@dataclass
class RankView:
    """What every rule may use about every rank, for one request."""

    prompt_len: int
    cached: Sequence[int]  # tokens each rank would serve from cache
    queued: Sequence[int]  # queued uncached prefill tokens
    running: Sequence[int]
    waiting: Sequence[int]
    kv_tokens: Sequence[int]  # KV tokens held by the rank's requests
    page_size: int
    # capacities and measured speed from the load snapshots (empty or 0: not reported); the guard reads them
    max_running: Sequence[int] = ()
    max_kv_tokens: Sequence[int] = ()
    prefill_us_per_token: Sequence[float] = ()

    @property
    def uncached(self) -> list[int]:
        return [self.prompt_len - c for c in self.cached]

    @property
    def batch(self) -> list[int]:
        return [r + w for r, w in zip(self.running, self.waiting, strict=True)]


Rule = Callable[[RankView, int], tuple[int, bool, list[float]]]


def _lowest(costs: Sequence[float], view: RankView, rotation: int) -> tuple[int, bool, list[float]]:
    rank, tie = pick_lowest(list(costs), list(view.queued), rotation)
    return rank, tie, list(costs)


def kvmul(view: RankView, rotation: int) -> tuple[int, bool, list[float]]:
    """LMetric (arXiv 2603.15202): (queued + uncached) * (running + waiting + 1)."""
    return _lowest(kvmul_scores(view.queued, view.uncached, view.batch), view, rotation)


def cache_only(view: RankView, rotation: int) -> tuple[int, bool, list[float]]:
    """Most cached tokens wins (pure affinity)."""
    return _lowest([-c for c in view.cached], view, rotation)


def load_only(view: RankView, rotation: int) -> tuple[int, bool, list[float]]:
    """Fewest running + waiting requests wins (SGLang's total_requests, with exact in-flight counts)."""
    return _lowest(view.batch, view, rotation)


def vllm_v1(view: RankView, rotation: int) -> tuple[int, bool, list[float]]:
    """vLLM v1's DP load balancer (DPLBAsyncMPClient): argmin 4 * waiting + running; cache-blind."""
    return _lowest([4 * w + r for r, w in zip(view.running, view.waiting, strict=True)], view, rotation)


def linear(alpha: float) -> Rule:
    """alpha * uncached/prompt + (1 - alpha) * batch/max_batch: the tuned linear combinator of
    normalised scorers (llm-d's weighted sum, Bailian-style production rules), alpha in [0, 1]."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")

    def rule(view: RankView, rotation: int) -> tuple[int, bool, list[float]]:
        top = max(1, max(view.batch))
        n = max(1, view.prompt_len)
        costs = [alpha * u / n + (1 - alpha) * b / top for u, b in zip(view.uncached, view.batch, strict=True)]
        return _lowest(costs, view, rotation)

    rule.__name__ = f"linear:{alpha:g}"
    return rule


def dynamo(prefill_load_scale: float = 1.0, overlap_credit: float = 1.0) -> Rule:
    """NVIDIA Dynamo's KV router cost (router-concepts.md), in blocks of the page size:
    prefill_load_scale * max(active_prefill + prompt - credit * overlap, 0) + active_decode + prompt."""

    def rule(view: RankView, rotation: int) -> tuple[int, bool, list[float]]:
        ps = view.page_size
        incoming = view.prompt_len / ps
        costs = []
        for q, c, kv in zip(view.queued, view.cached, view.kv_tokens, strict=True):
            adjusted = max(q / ps + incoming - overlap_credit * c / ps, 0.0)
            costs.append(prefill_load_scale * adjusted + kv / ps + incoming)
        return _lowest(costs, view, rotation)

    rule.__name__ = "dynamo"
    return rule


def sglang_cache_aware(cache_threshold: float = 0.5, balance_abs: int = 32, balance_rel: float = 1.1) -> Rule:
    """SGLang model gateway `cache_aware` (cache_aware.rs, Rust `CacheAwareConfig::default()`):
    if (max_load - min_load) > balance_abs and max_load > balance_rel * min_load: least load;
    elif best match rate > cache_threshold: best-matching rank; else least load. Load = requests."""

    def rule(view: RankView, rotation: int) -> tuple[int, bool, list[float]]:
        load = view.batch
        imbalanced = max(load) - min(load) > balance_abs and max(load) > balance_rel * min(load)
        best_rate = max(view.cached) / max(1, view.prompt_len)
        if not imbalanced and best_rate > cache_threshold:
            return _lowest([-c for c in view.cached], view, rotation)
        return _lowest(load, view, rotation)

    rule.__name__ = "sglang_cache_aware"
    return rule


def total_tokens(view: RankView, rotation: int) -> tuple[int, bool, list[float]]:
    """SGLang's `total_tokens`: fewest KV tokens held or about to be held (num_total_tokens). For the
    simulator; the live controller runs SGLang's own with `--load-balance-method total_tokens`."""
    return _lowest(view.kv_tokens, view, rotation)


def round_robin(view: RankView, rotation: int) -> tuple[int, bool, list[float]]:
    """SGLang's `round_robin`: the next rank in turn, blind to cache and load. For the simulator;
    the live controller runs SGLang's own with `--load-balance-method round_robin`."""
    n = len(view.cached)
    return rotation % n, True, [0.0] * n  # a "tie" every time, so the router advances the turn


RULES: dict[str, Callable[[], Rule]] = {
    "kvmul": lambda: kvmul,
    "kvmul_guard": lambda: GuardedKvmul(),
    "round_robin": lambda: round_robin,
    "total_tokens": lambda: total_tokens,
    "cache_only": lambda: cache_only,
    "load_only": lambda: load_only,
    "vllm_v1": lambda: vllm_v1,
    "dynamo": dynamo,
    "sglang_cache_aware": sglang_cache_aware,
}


def rule_by_name(name: str) -> Rule:
    """`kvmul`, `kvmul_guard`, `round_robin`, `total_tokens`, `cache_only`, `load_only`, `vllm_v1`,
    `dynamo`, `sglang_cache_aware`, or `linear:<alpha>`."""
    if name.startswith("linear:"):
        return linear(float(name.split(":", 1)[1]))
    if name not in RULES:
        raise ValueError(f"unknown routing rule {name!r}; choose from {sorted(RULES)} or linear:<alpha>")
    return RULES[name]()
