"""What a routing rule sees (`RankView`), what it returns (`Choice`), and the interface it implements.

Every rule gets the same exact cache figures (from the mirror) and the same load ledger, so a
comparison between rules measures the rule, not the quality of its inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from operator import add
from typing import Protocol


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
    # Capacities and measured speed from the load snapshots (empty or 0: not reported). The router
    # fills them only for a rule with `reads_capacity` (they cost a pass over the ranks per request).
    max_running: Sequence[int] = ()
    max_kv_tokens: Sequence[int] = ()
    prefill_us_per_token: Sequence[float] = ()
    # One more request in a decode batch, over one request's output, in prefill tokens (measured
    # and pooled over ranks, `decode_cost`; 0.0 until measured)
    decode_tokens_per_request: float = 0.0
    decode_batch_mean: float = 0.0  # requests per decode step, pooled likewise (0.0 until measured)
    decode_output_tokens: float = 0.0  # how long one output lasts on the clock, in prefill tokens, likewise
    # Each rank's measured slowness, mean 1, where its decode steps and its prefill tokens agree
    # (`decode_cost`); empty when the ranks measure alike
    rank_slowdown: Sequence[float] = ()
    # Per rank, the running requests that have not decoded past their first token (SGLang's, through
    # this package's scheduler hook; empty: not reported), and how much more a pause costs such a
    # request's TPOT than the pause term counts (`decode_cost.PooledOutputSpread`; 1.0 until measured)
    fresh: Sequence[int] = ()
    fresh_pause_weight: float = 1.0
    # SGLang's --enable-mixed-chunk: running requests decode inside each prefill step (default off: a
    # prefill step pauses every running decode on its rank)
    mixed_chunk: bool = False
    # SGLang's chunked_prefill_size on each rank, the most prompt tokens one prefill step takes (0: unchunked)
    chunk_tokens: int = 0
    # The longest cached prefix of the prompt that two or more cached prompts branch from (a shared
    # system prompt or document; `SharedRadixIndex.match_all_stem`), on any rank (0: none)
    stem: int = 0

    @cached_property
    def uncached(self) -> list[int]:
        return list(map(self.prompt_len.__sub__, self.cached))

    @cached_property
    def queued_mean(self) -> float:
        """The mean queued prefill over the ranks: the bound's backlog slack, and `marginal_behind`'s
        own slack too, read it on the same decision."""
        return sum(self.queued) / len(self.queued)

    @cached_property
    def kv_excess(self) -> list[int]:
        """Per rank, the tokens past its KV pool if it took this prompt: what its requests hold and are
        queued with (SGLang's num_total_tokens) plus the whole prompt, less the pool (0: room, or no
        pool reported). Computed once per view: `marginal_room`'s wait and `marginal_shared`'s gate
        both read it."""
        n, caps = self.prompt_len, self.max_kv_tokens
        if not caps:
            return [0] * len(self.kv_tokens)
        return [kv + n - cap if cap and kv + n > cap else 0 for kv, cap in zip(self.kv_tokens, caps, strict=True)]

    # Running + waiting per rank (rules and the router both read it): given by the router, which
    # keeps it current per rank instead of adding two lists on every request; else computed here.
    batch: Sequence[int] = ()

    def __post_init__(self) -> None:
        if len(self.batch) != len(self.running):
            if len(self.running) != len(self.waiting):
                raise ValueError("running and waiting differ in length")
            self.batch = list(map(add, self.running, self.waiting))


@dataclass(frozen=True, slots=True)
class Choice:
    """A rule's decision: the rank, whether the tie rotation picked it among equals, and its cost per
    rank (finite; lowest wins). `excluded` marks ranks the rule ruled out before comparing costs."""

    rank: int
    tie: bool
    costs: list[float]
    excluded: tuple[int, ...] = field(default=())


class Rule(Protocol):
    """A routing rule: a stable `name` (as `--kvmul-policy` spells it), whether it reads the capacity
    and speed fields of the view, and the choice for one request. `rotation` breaks ties."""

    name: str
    reads_capacity: bool

    def choose(self, view: RankView, rotation: int) -> Choice: ...
