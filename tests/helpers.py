"""Builders shared by the tests: core events, rule views, requests as the controller receives them."""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import msgspec
from sglang.srt.disaggregation.kv_events import KVEventBatch as SGLangBatch

from sglang_kvmul.core.block_hash import CacheNamespace, first_page_hash
from sglang_kvmul.core.events import BlockStored, KVEvent, batch_decoder
from sglang_kvmul.core.view import RankView


def stored(tokens: Sequence[int], salt: str | None = None, first_hash: int = 1000) -> BlockStored:
    """A root-level BlockStored of `tokens` (page size 1) with SGLang's first-page hash; the deeper
    pages get `first_hash`, `first_hash + 1`, ... (unique per prompt when the caller spaces them)."""
    hashes = [first_page_hash(tokens, 1, CacheNamespace(salt)), *range(first_hash, first_hash + len(tokens) - 1)]
    return BlockStored(block_hashes=hashes, parent_block_hash=None, token_ids=list(tokens), block_size=1)


def via_wire(events: Sequence[object]) -> list[KVEvent]:
    """SGLang's own event objects, encoded as its publisher encodes them and decoded as the
    controller decodes them: what the router receives from a real rank."""
    return batch_decoder().decode(msgspec.msgpack.encode(SGLangBatch(ts=0.0, events=list(events)))).events


def view(
    cached: Sequence[int],
    queued: Sequence[int] | None = None,
    running: Sequence[int] | None = None,
    waiting: Sequence[int] | None = None,
    kv: Sequence[int] | None = None,
    prompt: int = 1000,
    page: int = 1,
    max_running: Sequence[int] = (),
    max_kv: Sequence[int] = (),
    speed: Sequence[float] = (),
) -> RankView:
    zeros = [0] * len(cached)
    return RankView(
        prompt,
        list(cached),
        list(queued or zeros),
        list(running or zeros),
        list(waiting or zeros),
        list(kv or zeros),
        page,
        list(max_running),
        list(max_kv),
        list(speed),
    )


def request(rid: str, tokens: list[int] | None, routed_dp_rank: int | None = None, **extra: object) -> SimpleNamespace:
    """The fields of SGLang's TokenizedGenerateReqInput the dispatcher reads."""
    fields = dict(
        rid=rid, input_ids=tokens, routed_dp_rank=routed_dp_rank, cache_salt=None, extra_key=None, lora_id=None,
        return_logprob=False, logprob_start_len=-1, session_params=None, session_id=None, time_stats=None,
    )  # fmt: skip
    return SimpleNamespace(**{**fields, **extra})
