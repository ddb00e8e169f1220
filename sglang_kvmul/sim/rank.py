"""One simulated SGLang rank: what its scheduler does that matters for routing.

FCFS waiting queue; a step is either a prefill batch (SGLang's default: it stalls decoding; with
`mixed_chunk`, SGLang's --enable-mixed-chunk, the running requests decode one token inside it) or
one decode token for every running request. Runs of decode steps that nothing can
interrupt (no request finishes; a request routed here cuts the block with `interrupt`) are taken as
one block, step times summed exactly: the same timeline as stepping one by one, many fewer events. A
prefill batch takes waiting requests in order while their uncached tokens fit the chunked-prefill
budget (the first one may be cut into chunks across steps), the running cap allows, and the KV pool
has room for their new pages plus a decode reservation after evicting unreferenced cache. A
request's prompt pages are inserted into the prefix cache when its prefill completes (SGLang's
`cache_unfinished_req`), and its pages are released when it finishes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from sglang_kvmul.sim.cost import CostModel
from sglang_kvmul.sim.prefix_cache import Page, SimPrefixCache


@dataclass(eq=False)
class SimRequest:
    rid: int
    arrival: float
    tokens: Sequence[int]
    output_len: int
    rank: int = -1
    predicted_cached: int = 0
    cached: int = 0  # what the scheduler took from cache when it admitted the request
    prefilled: int = 0  # prompt tokens computed so far (beyond the cached prefix)
    generated: int = 0
    first_token: float | None = None
    finish: float | None = None
    path: list[Page] = field(default_factory=list)
    admitted: bool = False
    chunk: int = 0  # prompt tokens in the step in flight
    prompt_pages: int = 0  # KV pages reserved for the uncached prompt, until it enters the cache
    decode_pages: int = 0  # KV pages reserved for the output, until the request finishes
    # where the time went (`benchmarks/sim_diagnosis.py`)
    best_cached: int = 0  # the most any rank had cached for it when it was routed (the router's view)
    admitted_at: float | None = None  # its first prefill chunk started
    kv_blocked_at: float | None = None  # it first failed admission for want of KV pages
    kv_wait: float = 0.0  # time at the queue head waiting for KV pages
    # time in the queue while the rank's queue head (itself included) waited for KV pages: the whole
    # queue waits behind a head that has no room, so this is what a full pool cost it in all
    kv_blocked: float = 0.0
    stall: float = 0.0  # decode time lost to prefill steps while it was running


@dataclass
class RankConfig:
    page_size: int = 16
    kv_pages: int = 65536
    chunk_tokens: int = 8192
    max_running: int = 256
    decode_reserve_tokens: int = 256  # per admitted request (SGLang's new-token reservation)
    # SGLang's --enable-mixed-chunk: running requests decode one token inside each prefill step
    # (default off, as in SGLang: a prefill step pauses every running decode on the rank)
    mixed_chunk: bool = False


class SimRank:
    def __init__(self, rank: int, cfg: RankConfig, cost: CostModel) -> None:
        self.rank = rank
        self.cfg = cfg
        self.cost = cost
        self.cache = SimPrefixCache(cfg.page_size, cfg.kv_pages)
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self.prefilling: list[SimRequest] = []  # the batch of the step in flight
        self.busy_until: float | None = None
        self.decoding = False
        self.steps = 0
        self.prefilled_total = 0  # cumulative uncached prefill tokens (SGLang's load-snapshot counter)
        self.reserved_pages = 0
        self.prefill_busy_s = 0.0  # cumulative prefill step time (SGLang's total_prefill_busy_us)
        # SGLang's decode_moments: steps, sum b, sum t_us, sum b^2, sum b * t_us, generated
        self.decode_moments = [0.0] * 6
        self.context = 0  # prompt + generated tokens of the running requests
        self.decoded = 0  # generated tokens of the running requests (their KV is outside the cache)
        self.block_steps = 0  # decode steps in the block in flight
        self.block_start = 0.0
        self.version = 0  # bumped when the block in flight is cut short (its old end is void)
        self.mixed = False  # the prefill step in flight also decodes the running requests
        # running totals over the waiting queue: a snapshot must not walk a queue of thousands
        self.waiting_tokens = 0  # prompt tokens
        self.waiting_uncached = 0  # prompt tokens not cached and not prefilled yet
        self.kv_blocked_s = 0.0  # closed spans of time the queue head has waited for KV pages
        # the finished requests with two or more output tokens: count, sum of outputs, sum of
        # 1 / (output - 1) (what `serving.fresh_outputs` counts in SGLang's schedulers)
        self.finished_outputs = [0.0, 0.0, 0.0]

    def enqueue(self, req: SimRequest, now: float) -> None:
        """A routed request joins the back of the waiting queue."""
        req.kv_blocked = -self._blocked_until(now)  # completed at admission: the span's share
        self.waiting.append(req)
        self.waiting_tokens += len(req.tokens)
        self.waiting_uncached += len(req.tokens) - req.cached - req.prefilled

    def _blocked_until(self, now: float) -> float:
        """How long, in all up to `now`, the queue head has waited for KV pages (the spans are
        disjoint: one head at a time), so a request's share is a difference of two reads, O(1)."""
        head = self.waiting[0] if self.waiting else None
        open_span = now - head.kv_blocked_at if head and not head.admitted and head.kv_blocked_at is not None else 0.0
        return self.kv_blocked_s + open_span

    # ---- admission --------------------------------------------------------------------------
    def _limit(self, req: SimRequest) -> int:
        return len(req.tokens) - 1  # the last prompt token is always computed

    def _pages_for(self, tokens: int) -> int:
        return -(-tokens // self.cfg.page_size)

    def _admit(self, req: SimRequest, now: float) -> bool:
        path = self.cache.match(req.tokens, self._limit(req))
        prompt_pages = self._pages_for(len(req.tokens)) - len(path)
        decode_pages = self._pages_for(self.cfg.decode_reserve_tokens)
        short = prompt_pages + decode_pages - (self.cache.free_pages - self.reserved_pages)
        if short > 0:
            self.cache.ref(path)  # never evict our own prefix to make room for ourselves
            self.cache.evict(short)
            self.cache.unref(path, now)
            if prompt_pages + decode_pages > self.cache.free_pages - self.reserved_pages:
                if req.kv_blocked_at is None:
                    req.kv_blocked_at = now
                return False
        if req.kv_blocked_at is not None:
            req.kv_wait += now - req.kv_blocked_at
            self.kv_blocked_s += now - req.kv_blocked_at
        req.kv_blocked += self.kv_blocked_s
        self.cache.ref(path)
        req.path, req.admitted, req.admitted_at = path, True, now
        req.cached = len(path) * self.cfg.page_size
        self.waiting_uncached -= req.cached  # only the queue head is admitted
        req.prompt_pages, req.decode_pages = prompt_pages, decode_pages
        self.reserved_pages += prompt_pages + decode_pages
        return True

    # ---- steps -------------------------------------------------------------------------------
    def start_step(self, now: float, horizon: float = float("inf")) -> float | None:
        """Begin the next step if idle; returns its end time, or None when there is nothing to do.
        A decode block runs until a request finishes or a step ends at or after `horizon`
        (`interrupt` cuts it shorter when a request arrives)."""
        if self.busy_until is not None:
            return None
        budget = self.cfg.chunk_tokens
        batch: list[SimRequest] = []
        tokens = context = 0
        while self.waiting and budget > 0 and len(self.running) + len(batch) < self.cfg.max_running:
            req = self.waiting[0]
            if not req.admitted and not self._admit(req, now):
                if not self.running and not batch and not self.reserved_pages:
                    need = self._pages_for(len(req.tokens) + self.cfg.decode_reserve_tokens)
                    raise ValueError(f"request {req.rid} needs {need} KV pages; a rank has {self.cfg.kv_pages}")
                break
            todo = len(req.tokens) - req.cached - req.prefilled
            take = min(todo, budget)
            req.chunk = take
            tokens += take
            context += req.cached + req.prefilled
            budget -= take
            batch.append(req)
            if take < todo:
                break  # chunked: the rest of this prompt goes in the next step
            self.waiting.popleft()
            self.waiting_tokens -= len(req.tokens)
            self.waiting_uncached -= todo
        if batch:
            self.prefilling = batch
            self.decoding = False
            step = self.cost.prefill_s(tokens, context, len(batch))
            self.mixed = self.cfg.mixed_chunk and bool(self.running)
            if self.mixed:  # assumed: the decodes' tokens go through the layers with the chunk and
                # their KV reads come on top (`decode_s` minus its fixed part); no GPU measurement
                b = len(self.running)
                step = self.cost.prefill_s(tokens + b, context, len(batch) + b)
                step += self.cost.decode_s(b, self.context) - self.cost.decode_s(b, 0)
                lost = step - self.cost.decode_s(b, self.context)  # vs a plain decode step
            else:
                lost = step
            for req in self.running:  # paused (or, mixed, slowed) by this prefill
                req.stall += max(0.0, lost)
            self.prefill_busy_s += step
            self.busy_until = now + step
        elif self.running:
            self.decoding = True
            b, ctx, t, k = len(self.running), self.context, now, 0
            last = min(r.output_len - r.generated for r in self.running)
            while True:
                t += self.cost.decode_s(b, ctx)
                ctx += b
                k += 1
                if k >= last or t >= horizon:
                    break
            self.block_steps, self.block_start = k, now
            self.busy_until = t
        return self.busy_until

    def interrupt(self, now: float) -> float | None:
        """A request arrived at `now`: end the decode block in flight at the first step boundary at
        or after `now` (where stepping one by one would next look at the queue). Returns the new
        end if it moved (the old one is void: `version` changed), else None."""
        if not self.decoding or self.busy_until is None or self.block_steps <= 1:
            return None
        b, ctx, t, k = len(self.running), self.context, self.block_start, 0
        while t < now:
            t += self.cost.decode_s(b, ctx)
            ctx += b
            k += 1
        if k >= self.block_steps:
            return None  # `now` falls in the block's last step
        self.block_steps, self.busy_until = k, t
        self.version += 1
        return t

    def _decode(self, k: int) -> list[SimRequest]:
        """Every running request decodes `k` tokens; returns those that finished (out of the batch
        and its context)."""
        for req in self.running:
            req.generated += k
        self.context += k * len(self.running)
        self.decoded += k * len(self.running)
        done = [r for r in self.running if r.generated >= r.output_len]
        if done:
            self.running = [r for r in self.running if r.generated < r.output_len]
            for req in done:
                self.context -= len(req.tokens) + req.generated
                self.decoded -= req.generated
        return done

    def finish_step(self, now: float) -> list[SimRequest]:
        """Apply the step that ends now; returns the requests that finished."""
        self.busy_until = None
        done: list[SimRequest] = []
        if self.decoding:
            b, k, t_us = len(self.running), self.block_steps, (now - self.block_start) * 1e6
            m = self.decode_moments
            m[0] += k
            m[1] += k * b
            m[2] += t_us
            m[3] += k * b * b
            m[4] += b * t_us
            m[5] += k * b
            done = self._decode(self.block_steps)
        else:
            if self.mixed:  # every running request decoded one token inside the prefill step
                done = self._decode(1)
            for req in self.prefilling:
                req.prefilled += req.chunk
                self.prefilled_total += req.chunk
                if req.cached + req.prefilled < len(req.tokens):
                    self.waiting_uncached -= req.chunk
                    continue  # a chunk of a longer prompt: the request stays at the queue head
                path = self.cache.insert(req.tokens, now)
                self.cache.ref(path)
                self.cache.unref(req.path, now)
                req.path = path
                self.reserved_pages -= req.prompt_pages  # those pages are in the cache now
                req.first_token = now  # the prefill step samples the first token
                req.generated = 1
                if req.generated >= req.output_len:
                    done.append(req)
                else:
                    self.running.append(req)
                    self.context += len(req.tokens) + req.generated
                    self.decoded += req.generated
            self.prefilling = []
        fin = self.finished_outputs
        for req in done:
            req.finish = now
            self.cache.unref(req.path, now)
            self.reserved_pages -= req.decode_pages
            if req.output_len > 1:
                fin[0] += 1.0
                fin[1] += req.output_len
                fin[2] += 1.0 / (req.output_len - 1)
        return done

    # ---- what the router sees ----------------------------------------------------------------
    def snapshot(self, now: float) -> dict:
        return {
            "timestamp": now,
            "num_running_reqs": len(self.running),
            "num_waiting_reqs": len(self.waiting),
            "num_waiting_uncached_tokens": self.waiting_uncached,
            "total_prefill_uncached_tokens": self.prefilled_total,
            "total_prefill_busy_us": round(self.prefill_busy_s * 1e6),
            # SGLang's six sums, then the running requests not yet past their first token and the
            # finished outputs, as `serving.fresh_outputs` appends them (`load_ledger.FRESH`, `FINISHED`)
            "decode_moments": [
                *self.decode_moments,
                sum(1 for r in self.running if r.generated <= 1),
                *self.finished_outputs,
            ],
            "max_running_requests": self.cfg.max_running,
            "max_total_num_tokens": self.cfg.kv_pages * self.cfg.page_size,
            # SGLang: KV in use (pool minus free minus evictable: a prefix that running requests
            # share counts once) plus the waiting requests' whole seqlens
            "num_total_tokens": self.cache.locked_pages * self.cfg.page_size
            + self.decoded
            + sum(r.prefilled + r.chunk for r in self.prefilling)
            + self.waiting_tokens,
        }
