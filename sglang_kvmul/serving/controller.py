"""SGLang's DataParallelController with the `kvmul` method added (installed by `plugin.register`).

With any other `--load-balance-method` every method of the stock controller runs unchanged. With
`kvmul` the controller additionally:
  * subscribes to every rank's KV events and keeps an exact mirror of its radix cache,
  * routes each request through `dispatcher.KvmulDispatcher` (the rule, sessions, pinned ranks,
    per-request errors instead of dying),
  * waits on a `zmq.Poller` instead of spinning a core.
Control messages (abort, flush, sessions, weights, ...) and health checks keep the stock paths.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import signal
import time
from typing import Any

import psutil
import zmq
from sglang.srt.disaggregation.kv_events import uses_dynamo_format
from sglang.srt.managers.data_parallel_controller import DataParallelController
from sglang.srt.managers.io_struct import CloseSessionReqInput, sock_recv
from sglang.srt.runtime_context import describe_kv_events_publisher, get_parallel, get_schedule
from sglang.srt.utils.network import get_zmq_socket

from sglang_kvmul import METHOD_NAME
from sglang_kvmul.core.router import KvmulRouter
from sglang_kvmul.core.rules import rule_by_name
from sglang_kvmul.serving.dispatch_loop import DispatchLoop
from sglang_kvmul.serving.dispatcher import KvmulDispatcher
from sglang_kvmul.serving.event_registration import registry_port
from sglang_kvmul.serving.kv_events import RankEventStream, rank_endpoint
from sglang_kvmul.serving.metrics import KvmulCollector, serve
from sglang_kvmul.serving.settings import KvmulSettings

logger = logging.getLogger(__name__)


def _vocab_size(server_args: Any) -> int | None:
    """The model's vocabulary size, as SGLang's tokenizer manager checks it (None: unknown, logged)."""
    try:
        from sglang.srt.configs.model_config import ModelConfig

        return int(ModelConfig.from_server_args(server_args).vocab_size)
    except Exception as exc:
        logger.warning("kvmul: vocabulary size unknown (%s); token ids are checked for sign only", exc)
        return None


def is_kvmul(method: str | None) -> bool:
    return (method or "").lower() == METHOD_NAME


class KvmulDataParallelController(DataParallelController):
    """Stock controller + the `kvmul` dispatch method."""

    kvmul: KvmulDispatcher | None = None
    _loop: DispatchLoop | None = None

    def __init__(self, server_args: Any, port_args: Any, *args: Any, **kwargs: Any) -> None:
        self.kvmul_settings = KvmulSettings.from_env()
        self.kvmul_enabled = is_kvmul(get_parallel().load_balance_method)
        super().__init__(server_args, port_args, *args, **kwargs)
        if self.kvmul_enabled and get_parallel().node_rank == 0:
            self._init_kvmul(server_args, port_args)

    # ---- setup -----------------------------------------------------------------------------
    def _init_kvmul(self, server_args: Any, port_args: Any) -> None:
        settings = self.kvmul_settings
        self._remote_ranks: dict[int, int] = {}
        self._pending_streams: dict[int, tuple[RankEventStream, float]] = {}
        self._started, self._unregistered_logged = time.monotonic(), False
        self._unreachable: set[int] = set()  # logged and counted once each
        num_ranks = get_parallel().num_dp_ranks
        page_size = int(get_schedule().page_size or 1)
        dynamo_events = uses_dynamo_format(server_args.kv_events_config)
        chunk = get_schedule().chunked_prefill_size  # per rank (SGLang divides it by the attention-DP size)
        router = KvmulRouter(
            num_ranks,
            page_size,
            dynamo_events=dynamo_events,
            rule=rule_by_name(settings.policy),
            chunk_tokens=int(chunk) if chunk and chunk > 0 else 0,  # None or <= 0: chunking off
            mixed_chunk=bool(get_schedule().enable_mixed_chunk),
        )
        streams = self._event_streams(server_args, num_ranks, page_size)
        self.kvmul = KvmulDispatcher(
            router,
            self.workers,
            get_zmq_socket(self.context, zmq.PUSH, port_args.tokenizer_ipc_name, False),
            streams,
            settings,
            active_ranks=lambda: self._active_workers,
            read_snapshots=self.load_snapshot_reader.read_all,
            vocab_size=_vocab_size(server_args),
        )
        self._rank_procs = self._scheduler_procs_by_rank()
        self.kvmul.catch_up()
        for r in self._remote_ranks:  # scored by load until their node registers and connects
            router.mark_stale(r)
        for stream in streams:
            self._pending_streams[stream.rank] = (stream, time.monotonic())
        self.dispatching = self.kvmul.dispatch
        if settings.metrics_port is not None:
            serve(KvmulCollector(self.kvmul), settings.metrics_port, settings.metrics_host)
            logger.info(
                "kvmul: Prometheus metrics on http://%s:%s/metrics", settings.metrics_host, settings.metrics_port
            )
        logger.info(
            "kvmul (%s): rule %s, %d DP ranks, page size %d, prefill chunk %s, %s-format KV events %s",
            __name__,
            router.rule.name,
            num_ranks,
            page_size,
            router.chunk_tokens or "off",
            "dynamo" if dynamo_events else "default",
            [s.endpoint for s in streams] or "off",
        )

    def _event_streams(self, server_args: Any, num_ranks: int, page_size: int) -> list[RankEventStream]:
        """One stream per rank on this node (all ranks on one node); across nodes the other nodes'
        ranks get theirs when their node registers (`_poll_registry`)."""
        desc = describe_kv_events_publisher(server_args)
        if desc is None:
            logger.warning(
                "kvmul: no ZMQ KV-event publisher is configured (--kv-events-config); routing by load and "
                "in-flight prompts only. sglang_kvmul.launch_server configures one automatically."
            )
            return []
        if int(desc["block_size"]) != page_size:
            logger.warning("kvmul: event block size %s != page size %s", desc["block_size"], page_size)
        host = desc["endpoint_host"]
        host = "127.0.0.1" if host in ("*", "0.0.0.0", "::") else host
        self._events_desc = {**desc, "endpoint_host": host}
        nnodes = int(getattr(server_args, "nnodes", 1) or 1)
        per_node = num_ranks // nnodes if nnodes > 1 and num_ranks % nnodes == 0 else num_ranks
        self._remote_ranks = {r: r // per_node for r in range(per_node, num_ranks)}  # rank -> node
        if self._remote_ranks:
            self._open_registry(host, desc, num_ranks)
        return [self._stream(host, r) for r in range(num_ranks) if r not in self._remote_ranks]

    def _stream(self, host: str, rank: int) -> RankEventStream:
        desc = self._events_desc
        replay = desc.get("replay_endpoint_port_base")
        return RankEventStream(
            self.context,
            rank,
            rank_endpoint(f"tcp://{host}:{desc['endpoint_port_base']}", rank),
            rank_endpoint(f"tcp://{host}:{replay}", rank) if replay else None,
            topic=desc.get("topic") or "",
            replay_timeout_ms=self.kvmul_settings.replay_timeout_ms,
        )

    def _open_registry(self, host: str, desc: dict, num_ranks: int) -> None:
        """Where the other nodes' publishers tell us their address (`event_registration`)."""
        port = registry_port(int(desc["endpoint_port_base"]), num_ranks)
        self._registry = self.context.socket(zmq.ROUTER)
        self._registry.bind(f"tcp://{host}:{port}")
        logger.info(
            "kvmul: waiting for %d remote ranks to register at tcp://%s:%d", len(self._remote_ranks), host, port
        )

    def _poll_registry(self) -> None:
        """Streams for the remote ranks that registered since the last wake-up."""
        while True:
            try:
                ident, _, body = self._registry.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:
                continue  # not a REQ envelope
            self._registry.send_multipart([ident, b"", b"ok"])
            try:
                msg = json.loads(body)
                rank, addr = int(msg["rank"]), str(ipaddress.ip_address(msg["addr"]))
            except (ValueError, KeyError, TypeError) as exc:
                logger.warning("kvmul: ignored a malformed rank registration: %s", exc)
                continue
            node = self._remote_ranks.pop(rank, None)
            if node is None:
                continue  # a retried registration already handled, or not a remote rank
            logger.info("kvmul: rank %d (node %d) registered: it publishes on %s", rank, node, addr)
            stream = self._stream(addr, rank)
            self.kvmul.streams.append(stream)
            self._pending_streams[rank] = (stream, time.monotonic())
            if self._loop is not None:
                self._loop.add_stream(stream)

    def _watch_streams(self) -> None:
        """A rank whose stream has not connected within `unreachable_after_s` is stale (scored by
        load), logged and counted; once it connects, its history is replayed and it is exact again."""
        now = time.monotonic()
        limit = self.kvmul_settings.unreachable_after_s
        if self._remote_ranks and now - self._started > limit and not self._unregistered_logged:
            self._unregistered_logged = True
            logger.error("kvmul: ranks %s never registered their KV events; scored by load", sorted(self._remote_ranks))
        for r, (stream, since) in list(self._pending_streams.items()):
            if stream.reachable():
                del self._pending_streams[r]
                if self.kvmul.router.stale[r]:  # a remote rank, or one that connected late: its history
                    self.kvmul.router.apply_update(r, stream.catch_up())
                logger.info("kvmul: rank %d's KV events connected (%s)", r, stream.endpoint)
            elif now - since > limit and r not in self._unreachable:
                self._unreachable.add(r)
                self.kvmul.router.mark_stale(r)
                self.kvmul.unreachable_streams += 1
                logger.error("kvmul: rank %d's KV events at %s unreachable; scored by load", r, stream.endpoint)

    # ---- dispatch --------------------------------------------------------------------------
    def dispatching_with_trace(self, req: Any, refresh_load_budget: bool = True) -> None:
        if self.kvmul is None:
            return super().dispatching_with_trace(req, refresh_load_budget)
        try:
            super().dispatching_with_trace(req, refresh_load_budget)
        except Exception as exc:  # the stock wrapper around our dispatch (health checks, time stats)
            self.kvmul.reject(req, exc)

    def dispatch_health_check(self, req: Any) -> None:
        if self.kvmul is None:
            return super().dispatch_health_check(req)
        if req.routed_dp_rank is not None:  # the stock pinned path, but never blocking on a dead rank
            return self.kvmul.dispatch(req)
        self.kvmul.send_health_check(req)

    def send_control_message(self, obj: Any) -> None:
        if self.kvmul is not None and isinstance(obj, CloseSessionReqInput):
            self.kvmul.close_session(obj.session_id)
        super().send_control_message(obj)

    # ---- loop ------------------------------------------------------------------------------
    def event_loop(self) -> None:
        settings = self.kvmul_settings
        if self.kvmul is None and not settings.poll_all_methods:
            return super().event_loop()
        streams = self.kvmul.streams if self.kvmul is not None else ()
        ingest = self.kvmul.ingest if self.kvmul is not None else (lambda stream, n: None)
        loop = DispatchLoop(self.recv_from_tokenizer, streams, self._drain_requests, ingest, settings.slice_batches)
        self._loop = loop
        while True:
            self.soft_watchdog.feed()
            loop.run_once(settings.poll_ms)
            if self.kvmul is not None:
                # on every wake-up (at most poll_ms apart): the gauges follow SGLang's load
                # snapshots when no request arrives, a rank whose process exited is seen, and
                # (across nodes) registrations and unreachable event streams are handled
                self.kvmul.refresh_snapshots(time.time(), background=True)
                self._watch_ranks()
                self.kvmul.watch_sockets()
                if self._remote_ranks:
                    self._poll_registry()
                if self._pending_streams or self._remote_ranks:
                    self._watch_streams()

    # ---- ranks that die ----------------------------------------------------------------------
    def _scheduler_procs_by_rank(self) -> dict[int, list[Any]]:
        """This node's scheduler processes by DP rank, read from the titles SGLang gives them
        (`sglang::scheduler_DP<r>...`); attention-DP ranks share one group (key -1)."""
        by_rank: dict[int, list[Any]] = {}
        for proc in self.scheduler_procs:
            if proc is None:
                continue
            try:
                title = " ".join(psutil.Process(proc.pid).cmdline())
            except psutil.Error as exc:
                logger.warning(
                    "kvmul: scheduler pid %s unreadable (%s); its death is seen by its socket", proc.pid, exc
                )
                continue
            found = re.search(r"scheduler_DP(\d+)", title)
            if get_parallel().attn_dp_enabled or found is None:
                by_rank.setdefault(-1, []).append(proc)
            else:
                by_rank.setdefault(int(found.group(1)), []).append(proc)
        return by_rank

    def _watch_ranks(self) -> None:
        for rank, procs in list(self._rank_procs.items()):
            dead = [p for p in procs if p.exitcode is not None]
            if not dead:
                continue
            del self._rank_procs[rank]
            what = f"scheduler pid {dead[0].pid} exited with {dead[0].exitcode}"
            if rank < 0:  # attention DP: the other ranks wait on collectives with it, forever
                logger.error("kvmul: %s; attention-DP ranks cannot continue without it: shutting the server down", what)
                os.kill(os.getppid(), signal.SIGQUIT)  # SGLang's own shutdown path for a failed child
                return
            self.kvmul.rank_down(rank, what)

    def _drain_requests(self) -> None:
        while True:
            try:
                recv_req = sock_recv(self.recv_from_tokenizer, flags=zmq.NOBLOCK)
            except zmq.Again:  # nothing more waiting (a real socket error must not pass for this)
                return
            self._request_dispatcher(recv_req)
