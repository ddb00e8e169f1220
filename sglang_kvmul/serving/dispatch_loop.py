"""The controller's wait loop: requests first, KV events one batch at a time in between.

The controller is one thread on the path of every request. Events and requests arrive on
different sockets; ingesting a rank's whole backlog at once would hold every request that arrives
meanwhile behind it (and, with a publisher faster than ingestion, forever). So events are applied
one batch at a time, at most `slice_batches` per rank per wake-up, and after every batch the
request socket is checked: a request waits behind at most one event batch. Backlog left on a
socket keeps it readable (ZMQ polling is level-triggered), so the next wake-up continues at once.
Shared by `controller.KvmulDataParallelController` and `benchmarks/dispatch_stall.py`; the knobs
are `settings.KvmulSettings.slice_batches` and `poll_ms`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import zmq

from sglang_kvmul.serving.kv_events import RankEventStream
from sglang_kvmul.serving.settings import KvmulSettings

_DEFAULTS = KvmulSettings()


class DispatchLoop:
    def __init__(
        self,
        requests: zmq.Socket,
        streams: Sequence[RankEventStream],
        drain_requests: Callable[[], None],
        ingest: Callable[[RankEventStream, int | None], None],
        slice_batches: int | None = _DEFAULTS.slice_batches,
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
            self.add_stream(stream)
        self.drain_requests = drain_requests
        self.ingest = ingest
        self.slice_batches = slice_batches

    def add_stream(self, stream: RankEventStream) -> None:
        """Watch one more rank's events (a node that registered after the loop started)."""
        self.poller.register(stream.sub, zmq.POLLIN)
        self.by_socket[stream.sub] = stream

    def run_once(self, timeout_ms: int = _DEFAULTS.poll_ms) -> None:
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
