"""Subscribing to one DP rank's KV-event stream from SGLang's ZMQ publisher.

Wire format (SGLang 0.5.23 `ZmqEventPublisher`): PUB multipart `[topic, seq (8 B big-endian),
msgpack KVEventBatch]`; a ROUTER replay endpoint answers `[b"", start_seq]` from a DEALER with
`[b"", topic, seq, payload]` per buffered batch and then `seq == -1`. The PUB side is lossy (slow
joiners, high-water mark), so sequence numbers are checked and gaps are replayed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import msgspec
import zmq
from sglang.srt.disaggregation.kv_events import KVEventBatch, ZmqEventPublisher

logger = logging.getLogger(__name__)

_END_SEQ = -1


@dataclass
class StreamStats:
    batches: int = 0
    replayed_batches: int = 0
    duplicates: int = 0
    gaps: int = 0
    unrecovered_gaps: int = 0
    malformed: int = 0
    restarts: int = 0


def rank_endpoint(endpoint: str, rank: int) -> str:
    """The endpoint SGLang's rank `rank` uses, with wildcard hosts made connectable."""
    ep = ZmqEventPublisher.offset_endpoint_port(endpoint, rank) or endpoint
    for wildcard in ("tcp://*:", "tcp://0.0.0.0:"):
        if ep.startswith(wildcard):
            ep = "tcp://127.0.0.1:" + ep[len(wildcard) :]
    return ep


class RankEventStream:
    """SUB (+ replay DEALER) for one rank; turns frames into in-order event batches."""

    def __init__(
        self,
        context: zmq.Context,
        rank: int,
        endpoint: str,
        replay_endpoint: str | None,
        topic: str = "",
        replay_timeout_ms: int = 1000,
    ) -> None:
        self.rank = rank
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.replay_timeout_ms = replay_timeout_ms
        self.context = context
        self.stats = StreamStats()
        self.next_seq = 0
        self._decoder = msgspec.msgpack.Decoder(KVEventBatch)
        self.sub = context.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self.sub.setsockopt(zmq.RCVHWM, 0)
        self.sub.connect(endpoint)

    def close(self) -> None:
        self.sub.close(linger=0)

    def _decode(self, payload: bytes) -> KVEventBatch | None:
        try:
            return self._decoder.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.stats.malformed += 1
            logger.warning("kvmul: rank %d: dropped a malformed KV-event batch: %s", self.rank, exc)
            return None

    def replay(self, start_seq: int) -> list[tuple[int, KVEventBatch]]:
        """Fetch buffered batches with seq >= start_seq; empty if no replay endpoint answers."""
        if not self.replay_endpoint:
            return []
        dealer = self.context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(self.replay_endpoint)
        out: list[tuple[int, KVEventBatch]] = []
        try:
            dealer.send_multipart([b"", start_seq.to_bytes(8, "big", signed=True)])
            while dealer.poll(self.replay_timeout_ms):
                frames = dealer.recv_multipart()
                if len(frames) < 4:
                    self.stats.malformed += 1
                    continue
                seq = int.from_bytes(frames[2], "big", signed=True)
                if seq == _END_SEQ:
                    return out
                batch = self._decode(frames[3])
                if batch is not None:
                    out.append((seq, batch))
            logger.warning("kvmul: rank %d: replay from seq %d timed out", self.rank, start_seq)
            return out
        finally:
            dealer.close()

    def catch_up(self) -> list[KVEventBatch]:
        """Replay everything buffered so far (used when the controller joins)."""
        batches = []
        for seq, batch in self.replay(0):
            if seq >= self.next_seq:
                batches.append(batch)
                self.next_seq = seq + 1
                self.stats.replayed_batches += 1
        return batches

    def on_frames(self, frames: list[bytes]) -> list[KVEventBatch]:
        """In-order batches from one PUB message, replaying any gap before it."""
        if len(frames) != 3:
            self.stats.malformed += 1
            return []
        seq = int.from_bytes(frames[1], "big", signed=False)
        if seq < self.next_seq:
            if seq == 0:  # the publisher restarted: its stream begins again
                self.stats.restarts += 1
                self.next_seq = 0
            else:
                self.stats.duplicates += 1
                return []
        out: list[KVEventBatch] = []
        if seq > self.next_seq:
            self.stats.gaps += 1
            for rseq, batch in self.replay(self.next_seq):
                if self.next_seq <= rseq < seq:
                    if rseq != self.next_seq:
                        self.stats.unrecovered_gaps += 1
                    out.append(batch)
                    self.next_seq = rseq + 1
                    self.stats.replayed_batches += 1
            if self.next_seq != seq:
                self.stats.unrecovered_gaps += 1
                logger.warning(
                    "kvmul: rank %d: KV events %d..%d lost and not replayable", self.rank, self.next_seq, seq - 1
                )
        batch = self._decode(frames[2])
        self.next_seq = seq + 1
        if batch is not None:
            out.append(batch)
            self.stats.batches += 1
        return out

    def drain(self) -> list[KVEventBatch]:
        """All batches waiting on the SUB socket, without blocking."""
        out: list[KVEventBatch] = []
        while True:
            try:
                frames = self.sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return out
            out.extend(self.on_frames(frames))
