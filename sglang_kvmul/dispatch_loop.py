"""The controller's wait loop: requests first, KV events one batch at a time in between.

The controller is one thread on the path of every request. Events and requests arrive on
different sockets; ingesting a rank's whole backlog at once would hold every request that arrives
meanwhile behind it (and, with a publisher faster than ingestion, forever). So events are applied
one batch at a time, at most `slice_batches` per rank per wake-up, and after every batch the
request socket is checked: a request waits behind at most one event batch. Backlog left on a
socket keeps it readable (ZMQ polling is level-triggered), so the next wake-up continues at once.
Shared by `controller.KvmulDataParallelController` and `benchmarks/dispatch_stall.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import zmq

from sglang_kvmul.kv_events import RankEventStream, StreamUpdate
from sglang_kvmul.router import KvmulRouter

SLICE_BATCHES = 8  # event batches per rank per wake-up
POLL_MS = 100  # idle wake-up, so watchdogs keep being fed


def apply_update(router: KvmulRouter, rank: int, update: StreamUpdate) -> None:
    """What one message of a rank's stream means for the router: a rebuild, a loss, or new batches."""
    if update.rebuild:
        router.rebuild(rank, (e for b in update.batches for e in b.events))
        return
    if update.lost:
        router.mark_stale(rank)
    for batch in update.batches:
        router.apply_events(rank, batch.events)


def apply_stream(router: KvmulRouter, stream: RankEventStream, max_batches: int | None = None) -> None:
    """Apply (at most `max_batches` of) a rank's waiting KV-event batches to the router, in order."""
    for update in stream.drain(max_batches):
        apply_update(router, stream.rank, update)


class DispatchLoop:
    def __init__(
        self,
        requests: zmq.Socket,
        streams: Sequence[RankEventStream],
        drain_requests: Callable[[], None],
        ingest: Callable[[RankEventStream, int | None], None],
        slice_batches: int | None = SLICE_BATCHES,
    ) -> None:
        """`drain_requests()` dispatches every request waiting on `requests` without blocking;
        `ingest(stream, n)` applies at most `n` of a stream's waiting batches. `slice_batches=None`
        applies a stream's whole backlog per wake-up without checking for requests (the old loop,
        kept for the stall benchmark's contrast)."""
        self.requests = requests
        self.poller = zmq.Poller()
        self.poller.register(requests, zmq.POLLIN)
        self.by_socket = {}
        for stream in streams:
            self.poller.register(stream.sub, zmq.POLLIN)
            self.by_socket[stream.sub] = stream
        self.drain_requests = drain_requests
        self.ingest = ingest
        self.slice_batches = slice_batches

    def run_once(self, timeout_ms: int = POLL_MS) -> None:
        ready = dict(self.poller.poll(timeout_ms))
        self.drain_requests()
        for sock in ready:
            stream = self.by_socket.get(sock)
            if stream is None:
                continue
            if self.slice_batches is None:
                self.ingest(stream, None)
                continue
            for _ in range(self.slice_batches):
                self.ingest(stream, 1)
                if self.requests.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    self.drain_requests()
                if not stream.sub.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    break
