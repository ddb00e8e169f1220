"""The kvmul controller's dispatch path under faulty event streams: no request lost or sent twice.

The controller object is built without launching schedulers (its stock __init__ starts processes);
its dispatch entry point (`dispatching_with_trace`, the stock wrapper plus our override), its event
ingestion and its sockets are the real ones, and the events come from SGLang's real
ZmqEventPublisher. Faults a real server cannot be made to show on demand (malformed messages on
the event socket, a bug inside event handling) are injected from the test; sequence gaps,
replays and restarts are covered against the real publisher in test_kv_events.py.
"""

from __future__ import annotations

import atexit
import pickle
import time
from collections import Counter, OrderedDict
from types import SimpleNamespace

import zmq
from sglang.srt.disaggregation.kv_events import BlockStored, KVEventBatch, ZmqEventPublisher
from sglang.srt.managers.io_struct import AbortReq

from sglang_kvmul.block_hash import first_page_hash
from sglang_kvmul.controller import KvmulDataParallelController
from sglang_kvmul.kv_events import RankEventStream
from sglang_kvmul.ports import free_port_range
from sglang_kvmul.router import KvmulRouter

N_RANKS = 2


class _NoSnapshots:
    def read_all(self) -> list:
        return []


def request(rid: str, tokens: list[int], routed_dp_rank: int | None = None) -> SimpleNamespace:
    return SimpleNamespace(
        rid=rid, input_ids=tokens, routed_dp_rank=routed_dp_rank, cache_salt=None, extra_key=None, lora_id=None,
        return_logprob=False, logprob_start_len=-1, session_params=None, session_id=None, time_stats=None,
    )  # fmt: skip


def stored(tokens: list[int]) -> BlockStored:
    hashes = [
        first_page_hash(tokens, 1),
        *range(10_000 + tokens[0] * 1000, 10_000 + tokens[0] * 1000 + len(tokens) - 1),
    ]
    return BlockStored(block_hashes=hashes, parent_block_hash=None, token_ids=tokens, block_size=1, lora_id=None)


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

    ctrl = object.__new__(KvmulDataParallelController)
    ctrl.kvmul_enabled = True
    ctrl.refresh_load_budget_on_dispatch = False
    ctrl.router = KvmulRouter(N_RANKS, page_size=1)
    ctrl.dispatching = ctrl.kvmul_scheduler
    ctrl.sessions = OrderedDict()
    ctrl.rejected_requests = ctrl.ingest_errors = 0
    ctrl._last_snapshot_read = 0.0
    ctrl.load_snapshot_reader = _NoSnapshots()
    ctrl.decision_log = None
    ctrl.workers, sinks = [], []
    for r in range(N_RANKS):
        push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
        pull.bind(f"inproc://worker-{r}")
        push.connect(f"inproc://worker-{r}")
        ctrl.workers.append(push)
        sinks.append(pull)
    ctrl._active_workers = list(range(N_RANKS))
    tok_pull = ctx.socket(zmq.PULL)
    tok_pull.bind("inproc://tokenizer")
    ctrl.to_tokenizer = ctx.socket(zmq.PUSH)
    ctrl.to_tokenizer.connect("inproc://tokenizer")
    ctrl.streams = []
    for r in range(N_RANKS):
        stream = RankEventStream(
            ctx, r, f"tcp://127.0.0.1:{ports[0] + r}", f"tcp://127.0.0.1:{ports[1] + r}", replay_timeout_ms=300
        )
        stream.sub.connect(f"tcp://127.0.0.1:{raw_port}")
        ctrl.streams.append(stream)
    try:
        # wait until both subscribers receive (ZMQ slow joiner), publishing probes meanwhile
        deadline = time.monotonic() + 10
        for r, stream in enumerate(ctrl.streams):
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
            publishers[i % N_RANKS].publish(KVEventBatch(ts=time.time(), events=[stored([group + 1] * 50)]))
            if i == 40:  # a bug inside event handling, hit by the batch just published
                ctrl.router.apply_events = _raise
                assert ctrl.streams[i % N_RANKS].sub.poll(5000)
                ctrl._ingest(ctrl.streams[i % N_RANKS])
                ctrl.router.apply_events = real_apply
            for stream in ctrl.streams:
                if stream.sub.poll(5):
                    ctrl._ingest(stream)
            rid = f"req-{i}"
            routed = 1 if i % 25 == 0 else (7 if i % 31 == 0 else None)  # pinned, and an invalid rank
            ctrl.dispatching_with_trace(request(rid, tokens, routed))
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

        invalid = {f"req-{i}" for i in range(120) if i % 31 == 0 and i % 25 != 0}
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
