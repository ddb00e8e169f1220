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
from sglang.srt.disaggregation.kv_events import ZmqEventPublisher
from zmq.utils.monitor import recv_monitor_message

from sglang_kvmul.core.events import EventUpdate, KVEventBatch, batch_decoder

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
        self.last_ts = 0.0  # newest batch timestamp applied (tells a restart from a duplicate)
        self._decoder = batch_decoder()  # straight into the core's event types
        self.sub = context.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self.sub.setsockopt(zmq.RCVHWM, 0)
        # A reconnect may mean a restarted publisher (a restarted scheduler): watch for it. A
        # completed handshake says the publisher is reachable (and its allowlist admits us). The
        # monitor is attached before connecting, so that the first of these is never missed.
        self.monitor = self.sub.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self.sub.connect(endpoint)
        self._connects = 0
        self.handshakes = 0
        self._restart_suspect = False

    def close(self) -> None:
        self.sub.disable_monitor()
        self.monitor.close(linger=0)
        self.sub.close(linger=0)

    def _poll_monitor(self) -> None:
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_CONNECTED:
                self._connects += 1
                self._restart_suspect = self._restart_suspect or self._connects > 1
            elif event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.handshakes += 1

    def reachable(self) -> bool:
        """Whether the publisher has ever completed a handshake with us, or sent us a batch."""
        self._poll_monitor()
        return self.handshakes > 0 or self.stats.batches > 0

    def _new_incarnation(self) -> EventUpdate | None:
        """The publisher's full history if it restarted since we last applied a batch."""
        history = self.replay(0)
        if not history or history[0][0] != 0 or history[0][1].ts <= self.last_ts:
            return None
        self.stats.restarts += 1
        logger.warning("kvmul: rank %d: KV-event publisher restarted; mirror rebuilt from its replay", self.rank)
        self.next_seq = history[-1][0] + 1
        self.last_ts = max(b.ts for _, b in history)
        self.stats.replayed_batches += len(history)
        return EventUpdate([b for _, b in history], rebuild=True)

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

    def catch_up(self) -> EventUpdate:
        """The publisher's whole buffered history, for a controller that joins late.

        `lost` when the buffer no longer starts at the first batch (seq 0).
        """
        history = self.replay(0)
        if history:
            self.next_seq = history[-1][0] + 1
            self.last_ts = max(b.ts for _, b in history)
            self.stats.replayed_batches += len(history)
        return EventUpdate([b for _, b in history], rebuild=True, lost=bool(history) and history[0][0] != 0)

    def on_frames(self, frames: list[bytes]) -> EventUpdate:
        """In-order batches from one PUB message, replaying any gap before it.

        A gap the replay buffer no longer covers is reported as `lost`.
        """
        if len(frames) != 3 or len(frames[1]) != 8:
            self.stats.malformed += 1
            logger.warning("kvmul: rank %d: dropped a malformed KV-event message (%d frames)", self.rank, len(frames))
            return EventUpdate([])
        # Decode before trusting anything in the message: a malformed one must not move our position.
        batch = self._decode(frames[2])
        if batch is None:
            return EventUpdate([])
        seq = int.from_bytes(frames[1], "big", signed=False)
        update = EventUpdate([])
        self._poll_monitor()
        older = seq < self.next_seq
        if self._restart_suspect or (older and (seq == 0 or batch.ts > self.last_ts)):
            self._restart_suspect = False
            restarted = self._new_incarnation()
            if restarted is not None:
                return restarted  # a later message past its history arrives as a gap and is replayed
            if older and seq == 0 and not self.replay_endpoint:
                self.stats.restarts += 1  # no replay to confirm it: trust the new stream's seq 0
                self.next_seq = 0
                older = False
        if older:
            self.stats.duplicates += 1  # e.g. delivered both by the PUB socket and by a replay
            return update
        if seq > self.next_seq:
            self.stats.gaps += 1
            for rseq, replayed in self.replay(self.next_seq):
                if rseq == self.next_seq and rseq < seq:
                    update.batches.append(replayed)
                    self.next_seq = rseq + 1
                    self.stats.replayed_batches += 1
            if self.next_seq != seq:
                self.stats.unrecovered_gaps += 1
                update.lost = True
                logger.warning(
                    "kvmul: rank %d: KV events %d..%d lost and not replayable", self.rank, self.next_seq, seq - 1
                )
        self.next_seq = seq + 1
        update.batches.append(batch)
        self.last_ts = max(self.last_ts, *(b.ts for b in update.batches))
        self.stats.batches += 1
        return update

    def drain(self, max_messages: int | None = None) -> list[EventUpdate]:
        """Messages waiting on the SUB socket (at most `max_messages`), without blocking."""
        out: list[EventUpdate] = []
        while max_messages is None or len(out) < max_messages:
            try:
                frames = self.sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return out
            out.append(self.on_frames(frames))
        return out
