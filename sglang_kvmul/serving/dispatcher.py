"""The kvmul dispatch path of the controller: route or pin, book, send; answer what cannot be sent.

Held apart from SGLang's controller class (whose constructor starts the schedulers), so that it can
be built and tested on real sockets alone. Every request ends in exactly one of {sent to one rank,
answered with a per-request error}: it is validated (`core.request_checks`), the rank decided and
the request booked before anything is sent, and nothing raised on the way (a bad request, a bug in
a rule) leaves this class. Sends never block: a rank whose socket stops accepting (its scheduler
is gone) is taken down like one whose process exited, and the request goes to a live rank.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import zmq
from sglang.srt.managers.io_struct import AbortReq, sock_send
from zmq.utils.monitor import recv_monitor_message

from sglang_kvmul.core.block_hash import CacheNamespace
from sglang_kvmul.core.prefix import max_prefix_len
from sglang_kvmul.core.request_checks import check_request
from sglang_kvmul.core.router import Decision, KvmulRouter, NoRankAvailable
from sglang_kvmul.serving.health import write_rank_states
from sglang_kvmul.serving.kv_events import RankEventStream
from sglang_kvmul.serving.settings import KvmulSettings

logger = logging.getLogger(__name__)


class KvmulDispatcher:
    """Routes requests to `workers[rank]` with `router`; rejections go to `to_tokenizer`."""

    def __init__(
        self,
        router: KvmulRouter,
        workers: Sequence[zmq.Socket | None],
        to_tokenizer: zmq.Socket,
        streams: Sequence[RankEventStream] = (),
        settings: KvmulSettings | None = None,
        active_ranks: Callable[[], Sequence[int]] | None = None,
        read_snapshots: Callable[[], Iterable[Any]] | None = None,
        vocab_size: int | None = None,
    ) -> None:
        """`active_ranks()`: ranks SGLang currently serves with (elastic EP can change it; default all);
        `read_snapshots()`: SGLang's latest per-rank load snapshots (objects with `dp_rank`);
        `vocab_size`: token ids at or above it are rejected (None: only negative ones)."""
        self.router = router
        self.workers = workers
        self.to_tokenizer = to_tokenizer
        self.streams = list(streams)
        self.settings = settings or KvmulSettings()
        self.active_ranks = active_ranks or (lambda: range(router.num_ranks))
        self.read_snapshots = read_snapshots or (lambda: ())
        self.vocab_size = vocab_size
        self.sessions: OrderedDict[str, int] = OrderedDict()
        # recent requests per rank, so a rank that dies has its requests answered instead of hanging
        self.inflight: list[OrderedDict[str, None]] = [OrderedDict() for _ in range(router.num_ranks)]
        self.rejected_requests = 0
        self.ingest_errors = 0
        self.ranks_lost = 0
        self._health_turn = -1
        self._monitors: dict[zmq.Socket, int] | None = None
        self.aborted_on_rank_loss = 0
        self.unreachable_streams = 0  # ranks whose KV events could not be reached (across nodes)
        self._last_snapshot_read = 0.0
        self.down_reasons: dict[int, str] = {}
        self._write_health()
        path = self.settings.decision_log
        self.decision_log = open(path, "a", buffering=1) if path else None  # noqa: SIM115

    # ---- requests --------------------------------------------------------------------------
    def dispatch(self, req: Any) -> None:
        """Send `req` to one rank, or answer it with an error; never raises, never blocks."""
        try:
            rank, decision = self._decide(req)
            while not self._send(rank, req):  # that rank stopped accepting: it is down now
                if req.routed_dp_rank is not None:
                    raise NoRankAvailable(f"routed_dp_rank {rank} is down")
                rank, decision = self._decide(req)
        except NoRankAvailable as exc:
            self.reject(req, exc, status=503)
            return
        except Exception as exc:  # a bad request must never take the controller down
            self.reject(req, exc)
            return
        self._log_decision(req, decision)

    def _send(self, rank: int, req: Any) -> bool:
        """Hand `req` to the rank's scheduler without blocking; False (and the rank down) if its
        socket has no live peer. SGLang's PUSH sockets have no high-water mark, so a live scheduler
        never refuses."""
        try:
            sock_send(self.workers[rank], req, flags=zmq.NOBLOCK)
        except zmq.Again:
            self.rank_down(rank, "its request socket stopped accepting")
            return False
        inflight = self.inflight[rank]
        inflight[req.rid] = None
        if len(inflight) > self.settings.max_inflight_tracked:
            inflight.popitem(last=False)
        return True

    def watch_sockets(self, timeout_ms: int = 0) -> None:
        """Take down a rank whose scheduler's local (ipc) connection to its request socket closed:
        on one host that is the scheduler process gone. Monitors are attached on the first call
        (the schedulers are connected by then). A TCP peer (another node) may drop and come back,
        so only its process exit or a refused send takes it down."""
        if self._monitors is None:
            self._monitors = {}
            for r, w in enumerate(self.workers):
                if w is not None and w.getsockopt(zmq.LAST_ENDPOINT).startswith(b"ipc://"):
                    self._monitors[w.get_monitor_socket(zmq.EVENT_DISCONNECTED)] = r
            self._monitor_poller = zmq.Poller()
            for m in self._monitors:
                self._monitor_poller.register(m, zmq.POLLIN)
        if not self._monitors:
            return
        for sock, _ in self._monitor_poller.poll(timeout_ms):
            recv_monitor_message(sock)
            self.rank_down(self._monitors[sock], "its scheduler closed its request socket")

    def _write_health(self) -> None:
        """Tell the launcher's `/health` which ranks are down; a failure to write is logged, not raised."""
        if self.settings.health_file is None:
            return
        try:
            write_rank_states(self.settings.health_file, self.router.down, self.down_reasons)
        except OSError as exc:
            logger.error("kvmul: cannot write rank states to %s: %s", self.settings.health_file, exc)

    def send_health_check(self, req: Any) -> None:
        """A health check to the next live rank (never to a down one, never blocking)."""
        for _ in range(self.router.num_ranks):
            self._health_turn = (self._health_turn + 1) % self.router.num_ranks
            rank = self._health_turn
            if not self.router.down[rank] and rank in self.active_ranks() and self._send(rank, req):
                return
        logger.error("kvmul: no live DP rank for a health check")

    def rank_down(self, rank: int, reason: str) -> None:
        """Stop routing to `rank` and answer the requests it held (503): they would never finish."""
        if not self.router.set_down(rank):
            return
        self.ranks_lost += 1
        self.down_reasons[rank] = reason
        self._write_health()
        live = [r for r, d in enumerate(self.router.down) if not d]
        held = list(self.inflight[rank])
        self.inflight[rank].clear()
        logger.error(
            "kvmul: DP rank %d is down (%s); its %d recent requests are answered with 503; serving on ranks %s",
            rank, reason, len(held), live,
        )  # fmt: skip
        for rid in held:
            self.aborted_on_rank_loss += 1
            self._abort(rid, f"DP rank {rank} went down while serving this request", 503)
        for sid in [s for s, r in self.sessions.items() if r == rank]:
            del self.sessions[sid]  # sessions move to a live rank (their cache is gone anyway)

    def _decide(self, req: Any) -> tuple[int, Decision]:
        """Choose and book the rank (nothing is sent here: a failure leaves no trace on any rank)."""
        now = time.time()
        self.refresh_snapshots(now)
        tokens = req.input_ids
        check_request(
            tokens, self.vocab_size, bool(getattr(req, "return_logprob", False)), getattr(req, "logprob_start_len", -1)
        )
        namespace = CacheNamespace.of_request(
            getattr(req, "cache_salt", None), getattr(req, "extra_key", None), getattr(req, "lora_id", None)
        )
        limit = max_prefix_len(
            len(tokens), bool(getattr(req, "return_logprob", False)), getattr(req, "logprob_start_len", -1)
        )
        session = _session_key(req)
        router = self.router
        if req.routed_dp_rank is not None:
            rank = req.routed_dp_rank
            if not (isinstance(rank, int) and 0 <= rank < len(self.workers)) or self.workers[rank] is None:
                raise ValueError(f"routed_dp_rank {rank!r} is not a DP rank (0..{len(self.workers) - 1})")
            if rank not in self.active_ranks():
                raise ValueError(f"DP rank {rank} is not active")
            if router.down[rank]:
                raise NoRankAvailable(f"routed_dp_rank {rank} is down")
            return rank, router.assign(rank, tokens, limit, now, namespace)
        if session is not None and session in self.sessions and not router.down[self.sessions[session]]:
            self.sessions.move_to_end(session)
            rank = self.sessions[session]
            return rank, router.assign(rank, tokens, limit, now, namespace)
        decision = router.route(tokens, limit, now, namespace)
        if session is not None:
            self.sessions[session] = decision.rank
            if len(self.sessions) > self.settings.max_sticky_sessions:
                self.sessions.popitem(last=False)
        return decision.rank, decision

    def reject(self, req: Any, exc: Exception, status: int = 400) -> None:
        self.rejected_requests += 1
        logger.warning("kvmul: rejected request %s: %s", getattr(req, "rid", "?"), exc)
        self._abort(req.rid, f"routing failed: {exc}", status)

    def _abort(self, rid: str, message: str, status: int) -> None:
        reason = {"type": "abort", "message": message, "status_code": status}
        sock_send(self.to_tokenizer, AbortReq(rid=rid, finished_reason=reason, abort_message=message))

    def close_session(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)

    def refresh_snapshots(self, now: float, background: bool = False) -> None:
        """Fold in SGLang's latest load snapshots: on the dispatch path at most every
        `snapshot_refresh_s` (a burst reads them once); `background` reads (the loop's idle
        wake-ups, which keep the gauges fresh) do not count towards that throttle, so a request
        arriving just after one still reads the snapshot its predecessor's completion published."""
        if not background:
            if now - self._last_snapshot_read < self.settings.snapshot_refresh_s:
                return
            self._last_snapshot_read = now
        for snap in self.read_snapshots():
            if 0 <= snap.dp_rank < self.router.num_ranks:
                self.router.apply_snapshot(snap.dp_rank, snap, now)

    def _log_decision(self, req: Any, d: Decision) -> None:
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("kvmul: rid=%s rank=%d cached=%s scores=%s", req.rid, d.rank, d.cached, d.scores)
        if self.decision_log is not None:
            self.decision_log.write(json.dumps(decision_record(req, d), allow_nan=False) + "\n")

    # ---- KV events -------------------------------------------------------------------------
    def catch_up(self) -> None:
        """Each rank's buffered history, for a controller that starts after its ranks published."""
        for stream in self.streams:
            self.router.apply_update(stream.rank, stream.catch_up())

    def ingest(self, stream: RankEventStream, max_batches: int | None = None) -> None:
        """Apply (at most `max_batches` of) one rank's waiting KV events; a failure here must never
        reach request dispatch: the rank is marked stale (scored by load) and counted."""
        try:
            for update in stream.drain(max_batches):
                self.router.apply_update(stream.rank, update)
        except Exception:
            self.ingest_errors += 1
            self.router.mark_stale(stream.rank)
            logger.exception("kvmul: rank %d: KV-event ingestion failed; rank marked stale", stream.rank)

    def counters(self) -> dict[str, int]:
        return {
            "rejected_requests": self.rejected_requests,
            "ingest_errors": self.ingest_errors,
            "ranks_lost": self.ranks_lost,
            "aborted_on_rank_loss": self.aborted_on_rank_loss,
            "unreachable_event_streams": self.unreachable_streams,
        }


def decision_record(req: Any, d: Decision) -> dict:
    """One line of the decision log (JSON-safe: scores are finite, excluded ranks are listed)."""
    return {
        "t": time.time(),
        "rid": req.rid,
        "rank": d.rank,
        "prompt_len": d.prompt_len,
        "predicted_cached": d.predicted_cached,
        "cached": d.cached,
        "from_pending": d.from_pending,
        "queued": d.queued,
        "batch": d.batch,
        "scores": d.scores,
        "excluded": list(d.excluded),
        "pinned": req.routed_dp_rank is not None,
        # identifies a shared-prefix group in offline analysis (demo, benchmarks)
        "prefix_fp": hash(tuple(req.input_ids[:64])) if req.input_ids is not None else None,
    }


def _session_key(req: Any) -> str | None:
    params = getattr(req, "session_params", None)
    if params is not None and params.id is not None:
        return params.id
    return getattr(req, "session_id", None)
