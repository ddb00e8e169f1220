"""A guard for the product rule: detect, from live load indicators, the conditions in which
`(queued + uncached) * (batch + 1)` is known to misroute, and mitigate them without adding a weight.

The product trades relative changes of its two factors one for one. It goes wrong when one factor
stops measuring what it stands for:
* `saturated`: the chosen rank cannot start the request: its batch is at SGLang's
  `max_running_requests`, or its KV pool cannot take the request's uncached tokens on top of what
  its requests hold. Neither factor sees capacity, so a rank holding a popular prefix (uncached
  factor near zero) keeps winning while requests queue behind its cap or its KV pool (hot prefixes,
  long outputs, KV pressure). Mitigation: the product among the ranks that can start it now.
* `speed_spread`: the ranks' measured prefill time per token (SGLang's cumulative
  `total_prefill_busy_us` over `total_prefill_uncached_tokens`) differs by more than
  `tunables.SPEED_SPREAD`. The product counts tokens, and a slow rank's token costs more.
  Mitigation: count the prefill factor in measured time (tokens x that rank's us/token), the unit
  TTFT is made of.
* `backlogged`: every rank has uncached prefill queued, so no capacity is idle anywhere, and the
  product would move the request off the rank that caches its longest prefix. The move re-prefills
  that prefix on a cluster with no slack and keeps a second copy of it in another KV pool (under KV
  pressure, evicting other prefixes). The product counts that work once, as this request's own
  wait; everyone queued behind it pays for it again. Mitigation: the product among the ranks with
  the longest cached prefix; as soon as one rank drains, the condition clears and the product
  rebalances. (Simulated agentic sessions on 120k-token KV pools, `sim_experiments.py stress`: hit
  ratio 0.67 for kvmul, 0.72 with the guard, 0.75 for linear alpha 0.5; mean TTFT 53% and 22%
  worse than that alpha. A partial remedy: the rest is which prefixes the pools keep.)
With no condition the guard returns exactly the product's choice. Capacity wins over affinity: a
saturated candidate is replaced by the best rank that can start the request. Pure; the counters say
how often each condition changed a decision.
"""

from __future__ import annotations

from collections import Counter

from sglang_kvmul.core.score import kvmul_scores, pick_lowest, pick_lowest_among
from sglang_kvmul.core.tunables import SPEED_SPREAD
from sglang_kvmul.core.view import Choice, RankView


def saturated(view: RankView, rank: int) -> bool:
    """Whether `rank` cannot start this request now (capacity it reported; unknown counts as room)."""
    cap = view.max_running[rank] if view.max_running else 0
    kv_cap = view.max_kv_tokens[rank] if view.max_kv_tokens else 0
    full = cap > 0 and view.batch[rank] >= cap
    no_room = kv_cap > 0 and view.kv_tokens[rank] + view.prompt_len - view.cached[rank] > kv_cap
    return full or no_room


def speed_spread(view: RankView) -> bool:
    """Whether every rank has a measured prefill speed and they differ by more than SPEED_SPREAD."""
    speeds = list(view.prefill_us_per_token)
    return bool(speeds) and min(speeds) > 0 and max(speeds) > SPEED_SPREAD * min(speeds)


def backlogged(view: RankView) -> bool:
    """Whether every rank has uncached prefill queued (no idle capacity to move work to)."""
    return bool(view.queued) and min(view.queued) > 0


class GuardedKvmul:
    """The kvmul rule behind the three detectors above; `trips` counts the decisions they changed."""

    name = "kvmul_guard"
    reads_capacity = True  # the router fills RankView's capacity and speed fields for this rule only

    def __init__(self) -> None:
        self.trips: Counter[str] = Counter()

    def choose(self, view: RankView, rotation: int) -> Choice:
        queued, uncached, batch = view.queued, view.uncached, view.batch
        costs = kvmul_scores(queued, uncached, batch)  # the product, in time when speeds differ
        choice, tie = pick_lowest(costs, queued, rotation)
        keep = [True] * len(costs)
        reason, candidate = None, choice
        if speed_spread(view):
            costs = kvmul_scores(queued, uncached, batch, view.prefill_us_per_token)
            reason, candidate = "speed_spread", pick_lowest(costs, queued, rotation)[0]
        best = max(view.cached)
        if view.cached[candidate] < best and backlogged(view):
            keep = [c == best for c in view.cached]
            reason, candidate = "backlogged", self._pick(costs, keep, queued, rotation)[0]
        if saturated(view, candidate):
            free = [not saturated(view, r) for r in range(len(costs))]
            if any(free):
                keep, reason = free, "saturated"
        if reason is None:
            return Choice(choice, tie, costs)
        guarded, tie = self._pick(costs, keep, queued, rotation)
        if guarded != choice:
            self.trips[reason] += 1
        return Choice(guarded, tie, costs, tuple(r for r, k in enumerate(keep) if not k))

    def __repr__(self) -> str:
        return self.name

    @staticmethod
    def _pick(costs: list[float], keep: list[bool], queued, rotation: int) -> tuple[int, bool]:
        return pick_lowest_among(costs, keep, queued, rotation)
