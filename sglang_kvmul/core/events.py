"""The KV-event protocol: SGLang 0.5.23's wire types, declared here so that core stays SGLang-free.

The live controller decodes the publisher's msgpack straight into these (same tags, same field
names: `sglang.srt.disaggregation.kv_events`; a test decodes the real publisher's bytes), the
simulator emits them, and the router dispatches on their type. Fields the router does not read
(medium, lora_id, ...) are accepted and ignored, so a newer SGLang adding an optional field still
decodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec


class _Event(msgspec.Struct, tag=True, omit_defaults=True, gc=False):
    """Tagged msgpack map: `type` is the class name (SGLang's `KVCacheEvent`)."""


class BlockStored(_Event):
    """A chain of pages inserted under `parent_block_hash` (None: at a root)."""

    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int = 0
    lora_id: int | None = None


class BlockRemoved(_Event):
    """Pages evicted (with everything below them)."""

    block_hashes: list[int]


class AllBlocksCleared(_Event):
    """The whole cache was flushed (flush_cache, scheduler start)."""


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventBatch(msgspec.Struct, array_like=True, gc=False):
    """One published message: `[ts, events, attn_dp_rank]`."""

    ts: float
    events: list[KVEvent]
    attn_dp_rank: int | None = None


def batch_decoder() -> msgspec.msgpack.Decoder[KVEventBatch]:
    return msgspec.msgpack.Decoder(KVEventBatch)


@dataclass
class EventUpdate:
    """What one message of a rank's stream means for its mirror, in order (`KvmulRouter.apply_update`)."""

    batches: list[KVEventBatch] = field(default_factory=list)
    rebuild: bool = False  # `batches` is the full history: clear the mirror before applying them
    lost: bool = False  # events were lost for good: the mirror can no longer be trusted
