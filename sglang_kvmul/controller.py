"""SGLang's DataParallelController with the `kvmul` method added (installed by `plugin.register`).

With any other `--load-balance-method` every method of the stock controller runs unchanged. With
`kvmul` the controller additionally:
  * subscribes to every rank's KV events and keeps an exact mirror of its radix cache,
  * routes each request to the rank with the lowest `(queued + uncached) * (batch + 1)`,
  * keeps sessions on one rank, honours `routed_dp_rank`, and answers a request it cannot route
    with a per-request error instead of dying,
  * waits on a `zmq.Poller` instead of spinning a core.
Control messages (abort, flush, sessions, weights, ...) and health checks keep the stock paths.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import OrderedDict
from typing import Any

import zmq
from sglang.srt.disaggregation.kv_events import uses_dynamo_format
from sglang.srt.managers.data_parallel_controller import DataParallelController
from sglang.srt.managers.io_struct import AbortReq, CloseSessionReqInput, sock_recv, sock_send
from sglang.srt.runtime_context import describe_kv_events_publisher, get_parallel, get_schedule
from sglang.srt.utils.network import get_zmq_socket

from sglang_kvmul import METHOD_NAME
from sglang_kvmul.block_hash import CacheNamespace
from sglang_kvmul.dispatch_loop import POLL_MS, DispatchLoop, apply_stream
from sglang_kvmul.kv_events import RankEventStream, rank_endpoint
from sglang_kvmul.metrics import METRICS_HOST_ENV, METRICS_PORT_ENV, KvmulCollector, serve
from sglang_kvmul.policies import rule_by_name
from sglang_kvmul.prefix import max_prefix_len
from sglang_kvmul.router import Decision, KvmulRouter

logger = logging.getLogger(__name__)

DECISION_LOG_ENV = "SGLANG_KVMUL_DECISION_LOG"
# Opt-in: give stock methods the same blocking Poller loop (SGLang 0.5.23's loop spins a core).
# Off by default so that stock methods stay exactly stock; benchmarks turn it on for fairness.
POLL_ALL_METHODS_ENV = "SGLANG_KVMUL_POLL_ALL_METHODS"
# The routing rule (policies.rule_by_name): kvmul by default; the baselines are for comparisons.
POLICY_ENV = "SGLANG_KVMUL_POLICY"
SNAPSHOT_REFRESH_S = 0.005  # re-read SGLang's SHM load snapshots at most this often
MAX_STICKY_SESSIONS = 100_000


def is_kvmul(method: str | None) -> bool:
    return (method or "").lower() == METHOD_NAME


class KvmulDataParallelController(DataParallelController):
    """Stock controller + the `kvmul` dispatch method."""

    def __init__(self, server_args: Any, port_args: Any, *args: Any, **kwargs: Any) -> None:
        self.kvmul_enabled = is_kvmul(get_parallel().load_balance_method)
        super().__init__(server_args, port_args, *args, **kwargs)
        if self.kvmul_enabled and get_parallel().node_rank == 0:
            self._init_kvmul(server_args, port_args)

    # ---- setup -----------------------------------------------------------------------------
    def _init_kvmul(self, server_args: Any, port_args: Any) -> None:
        num_ranks = get_parallel().num_dp_ranks
        page_size = int(get_schedule().page_size or 1)
        rule = rule_by_name(os.environ.get(POLICY_ENV, "kvmul"))
        dynamo_events = uses_dynamo_format(server_args.kv_events_config)
        self.router = KvmulRouter(num_ranks, page_size, dynamo_events=dynamo_events, rule=rule)
        self.dispatching = self.kvmul_scheduler
        self.sessions: OrderedDict[str, int] = OrderedDict()
        self.rejected_requests = 0
        self.ingest_errors = 0
        self._last_snapshot_read = 0.0
        self.to_tokenizer = get_zmq_socket(self.context, zmq.PUSH, port_args.tokenizer_ipc_name, False)
        path = os.environ.get(DECISION_LOG_ENV)
        self.decision_log = open(path, "a", buffering=1) if path else None  # noqa: SIM115
        self.streams: list[RankEventStream] = []
        desc = describe_kv_events_publisher(server_args)
        if desc is None:
            logger.warning(
                "kvmul: no ZMQ KV-event publisher is configured (--kv-events-config); routing by load and "
                "in-flight prompts only. sglang_kvmul.launch_server configures one automatically."
            )
        else:
            if int(desc["block_size"]) != page_size:
                logger.warning("kvmul: event block size %s != page size %s", desc["block_size"], page_size)
            host = desc["endpoint_host"]
            host = "127.0.0.1" if host in ("*", "0.0.0.0", "::") else host
            base = f"tcp://{host}:{desc['endpoint_port_base']}"
            replay = desc.get("replay_endpoint_port_base")
            replay_base = f"tcp://{host}:{replay}" if replay else None
            for r in range(num_ranks):
                stream = RankEventStream(
                    self.context,
                    r,
                    rank_endpoint(base, r),
                    rank_endpoint(replay_base, r) if replay_base else None,
                    topic=desc.get("topic") or "",
                )
                self.streams.append(stream)
                update = stream.catch_up()
                self.router.rebuild(r, (e for b in update.batches for e in b.events))
                if update.lost:
                    self.router.mark_stale(r)
        self._maybe_serve_metrics()
        logger.info(
            "kvmul (%s): rule %s, %d DP ranks, page size %d, %s-format KV events %s",
            __name__,
            rule.__name__,
            num_ranks,
            page_size,
            "dynamo" if self.router.dynamo_events else "default",
            [s.endpoint for s in self.streams] or "off",
        )

    def _maybe_serve_metrics(self) -> None:
        port = os.environ.get(METRICS_PORT_ENV)
        if not port:
            return
        host = os.environ.get(METRICS_HOST_ENV, "127.0.0.1")
        counters = lambda: {"rejected_requests": self.rejected_requests, "ingest_errors": self.ingest_errors}  # noqa: E731
        serve(KvmulCollector(self.router, self.streams, counters), int(port), host)
        logger.info("kvmul: Prometheus metrics on http://%s:%s/metrics", host, port)

    # ---- dispatch --------------------------------------------------------------------------
    def _refresh_snapshots(self, now: float) -> None:
        if now - self._last_snapshot_read < SNAPSHOT_REFRESH_S:
            return
        self._last_snapshot_read = now
        for snap in self.load_snapshot_reader.read_all():
            if 0 <= snap.dp_rank < self.router.num_ranks:
                self.router.apply_snapshot(snap.dp_rank, snap, now)

    def kvmul_scheduler(self, req: Any) -> None:
        now = time.time()
        self._refresh_snapshots(now)
        tokens = req.input_ids if req.input_ids is not None else ()
        namespace = CacheNamespace.of_request(
            getattr(req, "cache_salt", None), getattr(req, "extra_key", None), getattr(req, "lora_id", None)
        )
        limit = max_prefix_len(
            len(tokens), bool(getattr(req, "return_logprob", False)), getattr(req, "logprob_start_len", -1)
        )
        session = _session_key(req)

        if req.routed_dp_rank is not None:
            self.maybe_external_dp_rank_routing(req)  # raises for an inactive rank
            decision = self.router.assign(req.routed_dp_rank, tokens, limit, now, namespace)
        elif session is not None and session in self.sessions:
            self.sessions.move_to_end(session)
            rank = self.sessions[session]
            decision = self.router.assign(rank, tokens, limit, now, namespace)
            sock_send(self.workers[rank], req)
        else:
            decision = self.router.route(tokens, limit, now, namespace)
            if session is not None:
                self.sessions[session] = decision.rank
                if len(self.sessions) > MAX_STICKY_SESSIONS:
                    self.sessions.popitem(last=False)
            sock_send(self.workers[decision.rank], req)
        self._log_decision(req, decision, now)

    def _log_decision(self, req: Any, d: Decision, now: float) -> None:
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("kvmul: rid=%s rank=%d cached=%s scores=%s", req.rid, d.rank, d.cached, d.scores)
        if self.decision_log is not None:
            record = {
                "t": now,
                "rid": req.rid,
                "rank": d.rank,
                "prompt_len": d.prompt_len,
                "predicted_cached": d.predicted_cached,
                "cached": d.cached,
                "from_pending": d.from_pending,
                "queued": d.queued,
                "batch": d.batch,
                "scores": d.scores,
                "pinned": req.routed_dp_rank is not None,
                # identifies a shared-prefix group in offline analysis (demo, benchmarks)
                "prefix_fp": hash(tuple(req.input_ids[:64])) if req.input_ids is not None else None,
            }
            self.decision_log.write(json.dumps(record) + "\n")

    def dispatching_with_trace(self, req: Any, refresh_load_budget: bool = True) -> None:
        if not self.kvmul_enabled:
            return super().dispatching_with_trace(req, refresh_load_budget)
        try:
            super().dispatching_with_trace(req, refresh_load_budget)
        except Exception as exc:  # a bad request must never take the controller down
            self._reject(req, exc)

    def _reject(self, req: Any, exc: Exception) -> None:
        self.rejected_requests += 1
        logger.warning("kvmul: rejected request %s: %s", getattr(req, "rid", "?"), exc)
        reason = {"type": "abort", "message": f"routing failed: {exc}", "status_code": 400}
        sock_send(self.to_tokenizer, AbortReq(rid=req.rid, finished_reason=reason, abort_message=str(exc)))

    def send_control_message(self, obj: Any) -> None:
        if self.kvmul_enabled and isinstance(obj, CloseSessionReqInput):
            self.sessions.pop(obj.session_id, None)
        super().send_control_message(obj)

    def _ingest(self, stream: RankEventStream, max_batches: int | None = None) -> None:
        """Apply (at most `max_batches` of) one rank's waiting KV events; a failure here must never
        reach request dispatch."""
        try:
            apply_stream(self.router, stream, max_batches)
        except Exception:
            self.ingest_errors += 1
            self.router.mark_stale(stream.rank)
            logger.exception("kvmul: rank %d: KV-event ingestion failed; rank marked stale", stream.rank)

    # ---- loop ------------------------------------------------------------------------------
    def event_loop(self) -> None:
        if not self.kvmul_enabled and os.environ.get(POLL_ALL_METHODS_ENV) != "1":
            return super().event_loop()
        loop = DispatchLoop(self.recv_from_tokenizer, getattr(self, "streams", ()), self._drain_requests, self._ingest)
        while True:
            self.soft_watchdog.feed()
            loop.run_once(POLL_MS)

    def _drain_requests(self) -> None:
        while True:
            try:
                recv_req = sock_recv(self.recv_from_tokenizer, flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                return
            self._request_dispatcher(recv_req)


def _session_key(req: Any) -> str | None:
    params = getattr(req, "session_params", None)
    if params is not None and params.id is not None:
        return params.id
    return getattr(req, "session_id", None)
