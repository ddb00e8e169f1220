"""SGLang's own radix cache (real code, on CPU, no memory pools) emitting its real KV events."""

from __future__ import annotations

from array import array
from types import SimpleNamespace

from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams
from sglang.srt.mem_cache.events import KvEventLoraNames
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey

from sglang_kvmul.core.block_hash import DEFAULT, CacheNamespace


class _FreeingAllocator:
    """Eviction hands pages back to the KV allocator; with no KV pool there is nothing to free."""

    device = "cpu"

    def free_segment(self, value, start_pos=0):
        return None


class SGLangCache:
    """RadixCache.create_simulated with events on; LoRA adapters registered as the scheduler does."""

    def __init__(self, page_size: int, dynamo: bool = False, lora_ids: tuple[str, ...] = ()) -> None:
        names = KvEventLoraNames()
        for lora_id in lora_ids:  # what the scheduler does for each admitted LoRA request
            names.register(SimpleNamespace(lora_id=lora_id, extra_key=lora_id), f"adapter-{lora_id}")
        self.cache = RadixCache.create_simulated(
            mock_allocator=_FreeingAllocator(),
            page_size=page_size,
            enable_kv_cache_events=True,
            dynamo_kv_event_format=dynamo,
            kv_event_lora_names=names,
        )

    @staticmethod
    def key(tokens: list[int], ns: CacheNamespace) -> RadixKey:
        return RadixKey(array("q", tokens), extra_key=ns.extra_key, cache_salt=ns.cache_salt)

    def insert(self, tokens: list[int], ns: CacheNamespace = DEFAULT) -> None:
        self.cache.insert(InsertParams(key=self.key(tokens, ns)))

    def match(self, tokens: list[int], ns: CacheNamespace = DEFAULT) -> int:
        return self.cache.match_prefix(MatchPrefixParams(key=self.key(tokens, ns))).device_prefix_len

    def evict(self, num_tokens: int) -> None:
        self.cache.evict(EvictParams(num_tokens=num_tokens))

    def flush(self) -> None:
        self.cache.reset()

    def take_events(self) -> list:
        return self.cache.kv_events.take()
