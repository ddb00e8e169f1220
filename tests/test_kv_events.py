"""Event-stream recovery against SGLang's real ZmqEventPublisher (in-process, loopback ports).

Message loss cannot be forced on demand from a real PUB socket (it drops only past its high-water
mark or before a slow subscriber joins), so the gap tests withhold received messages from the
stream instead; replays, restarts and the publisher are SGLang's real ones. The malformed-message
test uses a raw ZMQ PUB socket: a real server never sends malformed data.
"""

from __future__ import annotations

import atexit
import time

import msgspec
import pytest
import zmq
from sglang.srt.disaggregation.kv_events import AllBlocksCleared, BlockStored, KVEventBatch, ZmqEventPublisher

from sglang_kvmul.core.block_hash import first_page_hash
from sglang_kvmul.core.router import KvmulRouter
from sglang_kvmul.launch.ports import free_port_range
from sglang_kvmul.serving.dispatch_loop import DispatchLoop
from sglang_kvmul.serving.kv_events import RankEventStream


def stored(prompt: list[int]) -> BlockStored:
    hashes = [first_page_hash(prompt, 1), *(hash((tuple(prompt[: i + 1]),)) for i in range(1, len(prompt)))]
    return BlockStored(block_hashes=hashes, parent_block_hash=None, token_ids=prompt, block_size=1, lora_id=None)


PROMPTS = [[g * 10 + i for i in range(6)] for g in range(1, 7)]


class Harness:
    def __init__(self) -> None:
        self.pub_port = free_port_range(1)
        self.replay_port = free_port_range(1, {self.pub_port})
        self.publisher = self.new_publisher()
        self.ctx = zmq.Context()
        self.stream = RankEventStream(
            self.ctx, 0, f"tcp://127.0.0.1:{self.pub_port}", f"tcp://127.0.0.1:{self.replay_port}"
        )
        self.router = KvmulRouter(num_ranks=1, page_size=1)
        self.synced_seq = 0  # messages below this seq were covered by `connected()`

    def new_publisher(self) -> ZmqEventPublisher:
        publisher = ZmqEventPublisher(
            attn_dp_rank=0,
            endpoint=f"tcp://127.0.0.1:{self.pub_port}",
            replay_endpoint=f"tcp://127.0.0.1:{self.replay_port}",
            bind=True,
        )
        atexit.unregister(publisher.shutdown)  # the tests shut it down themselves
        return publisher

    def publish(self, *events) -> None:
        self.publisher.publish(KVEventBatch(ts=time.time(), events=list(events)))
        self.publisher._event_queue.join()  # the publisher thread has sent it

    def receive(self, n: int, timeout: float = 10.0) -> list[list[bytes]]:
        frames = []
        while len(frames) < n:
            assert self.stream.sub.poll(int(timeout * 1000)), f"got {len(frames)} of {n} messages"
            msg = self.stream.sub.recv_multipart()
            # a connect probe still in flight when `connected()` caught up is not one of the n
            if int.from_bytes(msg[1], "big") >= self.synced_seq:
                frames.append(msg)
        return frames

    def apply(self, update) -> None:
        self.router.apply_update(0, update)  # what the controller does with each message

    def cached(self, prompt: list[int]) -> int:
        return self.router.decide([*prompt, 99], limit=len(prompt)).cached[0]

    def connected(self) -> None:
        """Publish probes until the SUB receives one (ZMQ's slow-joiner window), then resync."""
        deadline = time.monotonic() + 10
        while not self.stream.sub.poll(50):
            assert time.monotonic() < deadline, "subscriber never connected"
            self.publish(AllBlocksCleared())
        self.stream.drain()
        self.apply(self.stream.catch_up())
        self.synced_seq = self.stream.next_seq

    def close(self) -> None:
        self.stream.close()
        self.publisher.shutdown()
        self.ctx.term()


@pytest.fixture
def h():
    harness = Harness()
    yield harness
    harness.close()


def test_late_joiner_catches_up_from_the_replay_buffer(h):
    h.publish(stored(PROMPTS[0]))
    h.publish(stored(PROMPTS[1]))
    h.apply(h.stream.catch_up())
    assert h.cached(PROMPTS[0]) == 6 and h.cached(PROMPTS[1]) == 6
    assert h.stream.next_seq == 2


def test_gap_is_replayed_in_order(h):
    h.connected()
    h.publish(stored(PROMPTS[0]))
    h.publish(stored(PROMPTS[1]))
    h.publish(stored(PROMPTS[2]))
    first, _lost, last = h.receive(3)
    h.apply(h.stream.on_frames(first))
    update = h.stream.on_frames(last)  # the middle message never reached the stream
    assert not update.lost and len(update.batches) == 2
    h.apply(update)
    assert [h.cached(p) for p in PROMPTS[:3]] == [6, 6, 6]
    assert h.stream.stats.gaps == 1 and h.stream.stats.replayed_batches >= 1
    # the withheld message arriving late is a duplicate and is dropped
    assert h.stream.on_frames(_lost).batches == [] and h.stream.stats.duplicates == 1


def test_unreplayable_gap_marks_the_rank_stale_until_the_cache_is_cleared(h):
    h.connected()
    h.publish(stored(PROMPTS[0]))
    (frames,) = h.receive(1)
    h.apply(h.stream.on_frames(frames))
    assert h.cached(PROMPTS[0]) == 6
    h.stream.replay_endpoint = None  # nothing can be replayed any more
    seq = h.stream.next_seq

    def message(at: int, *events) -> list[bytes]:
        return [b"", at.to_bytes(8, "big"), msgspec.msgpack.encode(KVEventBatch(ts=0.0, events=list(events)))]

    update = h.stream.on_frames(message(seq + 5, stored(PROMPTS[1])))  # seq .. seq+4 are gone
    assert update.lost and h.stream.stats.unrecovered_gaps == 1
    h.apply(update)
    assert h.router.stale[0]
    assert h.cached(PROMPTS[0]) == 0 and h.cached(PROMPTS[1]) == 0  # scored as caching nothing
    h.apply(h.stream.on_frames(message(seq + 6, AllBlocksCleared(), stored(PROMPTS[3]))))
    assert not h.router.stale[0] and h.cached(PROMPTS[3]) == 6 and h.cached(PROMPTS[1]) == 0


def test_publisher_restart_starts_the_stream_again(h):
    h.connected()
    h.publish(stored(PROMPTS[0]))
    h.apply(h.stream.on_frames(h.receive(1)[0]))
    assert h.cached(PROMPTS[0]) == 6
    h.publisher.shutdown()
    deadline = time.monotonic() + 10
    while True:  # the old publisher's thread closes its sockets asynchronously
        try:
            h.publisher = h.new_publisher()  # a restarted scheduler: sequence numbers begin at 0 again
            break
        except zmq.ZMQError:
            assert time.monotonic() < deadline, "old publisher never released its port"
            time.sleep(0.05)
    # Like SGLang's scheduler, the new tree announces itself with AllBlocksCleared. The SUB
    # reconnects by itself, but may miss the first messages (slow joiner): keep publishing.
    h.publish(AllBlocksCleared(), stored(PROMPTS[4]))
    deadline = time.monotonic() + 10
    while not h.stream.sub.poll(50):
        assert time.monotonic() < deadline, "subscriber never reconnected"
        h.publish(stored(PROMPTS[5]))
    for update in h.stream.drain():
        h.apply(update)
    assert h.stream.stats.restarts == 1
    assert h.cached(PROMPTS[0]) == 0  # the restarted cache is empty: the old blocks are gone
    assert h.cached(PROMPTS[4]) == 6 and h.cached(PROMPTS[5]) == 6


def test_malformed_messages_are_counted_and_dropped(h):
    h.connected()
    before = h.stream.next_seq
    bad = [
        [b"", before.to_bytes(8, "big"), b"\xc1 not msgpack"],
        [b"only-one-frame"],
        [b"", b"\x01", b"short seq"],
    ]
    for frames in bad:
        update = h.stream.on_frames(frames)
        assert update.batches == [] and not update.rebuild
    assert h.stream.stats.malformed == 3
    h.publish(stored(PROMPTS[5]))  # the stream keeps working
    h.apply(h.stream.on_frames(h.receive(1)[0]))
    assert h.cached(PROMPTS[5]) == 6


def test_dispatch_loop_serves_requests_between_bounded_event_slices(h):
    """A backlog of 40 KV-event batches never holds a waiting request: the loop dispatches it first,
    one arriving mid-slice waits behind one batch at most, and a wake-up ingests at most
    `slice_batches` batches until the backlog is gone."""
    h.connected()
    for g in range(40):
        h.publish(stored([g + 100, g + 200, g + 300]))
    assert h.stream.sub.poll(5000)
    pull, push = h.ctx.socket(zmq.PULL), h.ctx.socket(zmq.PUSH)
    pull.bind("inproc://requests")
    push.connect("inproc://requests")
    log: list[tuple[str, object]] = []

    def drain_requests() -> None:
        while True:
            try:
                log.append(("request", pull.recv(zmq.NOBLOCK)))
            except zmq.Again:
                return

    def ingest(stream: RankEventStream, n: int) -> None:
        updates = stream.drain(n)
        for u in updates:
            h.apply(u)
        log.append(("events", len(updates)))
        if len(log) == 4:
            push.send(b"r2")  # arrives in the middle of a slice

    loop = DispatchLoop(pull, [h.stream], drain_requests, ingest, slice_batches=8)
    push.send(b"r1")
    loop.run_once(1000)
    assert log[0] == ("request", b"r1") and log[1][0] == "events" and 1 <= log[1][1] <= 8
    assert log[4] == ("request", b"r2")  # served before the next event batch
    for _ in range(200):
        if sum(n for kind, n in log if kind == "events") == 40:
            break
        loop.run_once(1000)
    assert sum(n for kind, n in log if kind == "events") == 40
    assert max(n for kind, n in log if kind == "events") <= 8
    assert h.cached([139, 239, 339]) == 3  # the last batch was applied
    pull.close(linger=0)
    push.close(linger=0)
