"""The kvmul controller's dispatch path under faulty event streams: no request lost or sent twice.

The controller's kvmul half, `KvmulDispatcher`, is built as the controller builds it, on real ZMQ
sockets (SGLang's controller constructor would also start the schedulers); the events come from
SGLang's real ZmqEventPublisher. Faults a real server cannot be made to show on demand (malformed messages on
the event socket, a bug inside event handling) are injected from the test; sequence gaps,
replays and restarts are covered against the real publisher in test_kv_events.py.
"""

from __future__ import annotations

import atexit
import pickle
import time
from collections import Counter

import zmq
from helpers import request, stored
from sglang.srt.disaggregation.kv_events import KVEventBatch, ZmqEventPublisher
from sglang.srt.managers.io_struct import AbortReq

from sglang_kvmul.core.router import KvmulRouter
from sglang_kvmul.launch.ports import free_port_range
from sglang_kvmul.serving.dispatcher import KvmulDispatcher
from sglang_kvmul.serving.kv_events import RankEventStream

N_RANKS = 2


def _raise(rank, events):
    raise RuntimeError("a bug in event handling")


def test_no_request_lost_or_duplicated_while_event_streams_fail():
    ctx = zmq.Context()
    ports = [free_port_range(2), None]
    ports[1] = free_port_range(2, set(range(ports[0], ports[0] + 2)))
    publishers = []
    for r in range(N_RANKS):
        pub = ZmqEventPublisher(
            attn_dp_rank=r,
            endpoint=f"tcp://127.0.0.1:{ports[0]}",
            replay_endpoint=f"tcp://127.0.0.1:{ports[1]}",
            bind=True,
        )
        atexit.unregister(pub.shutdown)
        publishers.append(pub)
    raw = ctx.socket(zmq.PUB)  # a broken publisher the test controls
    raw_port = raw.bind_to_random_port("tcp://127.0.0.1")

    workers, sinks = [], []
    for r in range(N_RANKS):
        push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
        pull.bind(f"inproc://worker-{r}")
        push.connect(f"inproc://worker-{r}")
        workers.append(push)
        sinks.append(pull)
    tok_pull = ctx.socket(zmq.PULL)
    tok_pull.bind("inproc://tokenizer")
    to_tokenizer = ctx.socket(zmq.PUSH)
    to_tokenizer.connect("inproc://tokenizer")
    streams = []
    for r in range(N_RANKS):
        stream = RankEventStream(
            ctx, r, f"tcp://127.0.0.1:{ports[0] + r}", f"tcp://127.0.0.1:{ports[1] + r}", replay_timeout_ms=300
        )
        stream.sub.connect(f"tcp://127.0.0.1:{raw_port}")
        streams.append(stream)
    ctrl = KvmulDispatcher(KvmulRouter(N_RANKS, page_size=1), workers, to_tokenizer, streams)
    try:
        # wait until both subscribers receive (ZMQ slow joiner), publishing probes meanwhile
        deadline = time.monotonic() + 10
        for r, stream in enumerate(streams):
            while not stream.sub.poll(50):
                assert time.monotonic() < deadline
                publishers[r].publish(KVEventBatch(ts=time.time(), events=[]))

        sent = []
        real_apply = ctrl.router.apply_events
        for i in range(120):
            group = i % 6
            tokens = [group + 1] * 50 + [i % 256 + 3] * 5
            if i % 10 == 3:
                raw.send_multipart([b"", (i * 7).to_bytes(8, "big"), b"\xc1garbage"])  # malformed
            publishers[i % N_RANKS].publish(
                KVEventBatch(ts=time.time(), events=[stored([group + 1] * 50, first_hash=10_000 + (group + 1) * 1000)])
            )
            if i == 40:  # a bug inside event handling, hit by the batch just published
                ctrl.router.apply_events = _raise
                assert ctrl.streams[i % N_RANKS].sub.poll(5000)
                ctrl.ingest(ctrl.streams[i % N_RANKS])
                ctrl.router.apply_events = real_apply
            for stream in ctrl.streams:
                if stream.sub.poll(5):
                    ctrl.ingest(stream)
            rid = f"req-{i}"
            routed = 1 if i % 25 == 0 else (7 if i % 31 == 0 else None)  # pinned, and an invalid rank
            if i == 51:  # pinned to a valid rank, but the router cannot book it: answered, never sent
                tokens, routed = [-5, 1, 2], 1
            ctrl.dispatch(request(rid, tokens, routed))
            sent.append(rid)

        delivered: Counter[str] = Counter()
        for sink in sinks:
            while sink.poll(200):
                delivered[pickle.loads(sink.recv()).rid] += 1
        rejected = []
        while tok_pull.poll(200):
            msg = pickle.loads(tok_pull.recv())
            assert isinstance(msg, AbortReq) and msg.finished_reason["status_code"] == 400
            rejected.append(msg.rid)

        invalid = {f"req-{i}" for i in range(120) if i % 31 == 0 and i % 25 != 0} | {"req-51"}
        assert sorted(rejected) == sorted(invalid)  # answered with a per-request error
        assert all(n == 1 for n in delivered.values()), [r for r, n in delivered.items() if n != 1]
        assert set(delivered) | set(rejected) == set(sent) and not set(delivered) & set(rejected)
        stats = [s.stats for s in ctrl.streams]
        assert sum(s.malformed for s in stats) > 0 and sum(s.batches for s in stats) > 0
        assert ctrl.ingest_errors == 1 and ctrl.rejected_requests == len(invalid)
        assert ctrl.router.stats.stale_marks >= 1
    finally:
        for stream in ctrl.streams:
            stream.close()
        for pub in publishers:
            pub.shutdown()
        ctx.destroy(linger=0)
