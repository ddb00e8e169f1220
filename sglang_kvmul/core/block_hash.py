"""SGLang 0.5.23's KV-event block hash of a prompt's first page, recomputed with hashlib.

Every cache namespace (cache_salt, LoRA adapter, and in the "dynamo" event format any extra_key)
changes the first page's published hash, and each `BlockStored` without a parent carries that hash.
So the mirror keys its roots by it, and a request finds its namespace's subtree with one SHA-256.
Recipe (sglang/srt/mem_cache/utils.py, events.py, disaggregation/kv_events.py):
  digest  = SHA256([seed] || uint32_le(t) for t in page)   seed = SHA256(b"sglang-cache-salt-v1\\0"+salt)
  hash    = int64_be(digest[:8])
  published = hash, or SHA256(ns_seed || int64_be(hash))[:8] when the namespace applies, with
  ns_seed = SHA256(b"sglang-kv-event-namespace-v1" || part(extra_key) || part(salt))
Pure: no SGLang import (the tests check it against SGLang's own radix cache events).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

_SALT_TAG = b"sglang-cache-salt-v1\0"
_NAMESPACE_TAG = b"sglang-kv-event-namespace-v1"


@dataclass(frozen=True)
class CacheNamespace:
    """What separates a request's cache subtree in SGLang's scheduler."""

    cache_salt: str | None = None
    extra_key: str | None = None  # as the scheduler forms it: (extra_key or "") + lora_id for LoRA
    lora: bool = False  # extra_key includes a LoRA adapter (namespaced even in the default format)

    @classmethod
    def of_request(cls, cache_salt: str | None, extra_key: str | None, lora_id: str | None) -> CacheNamespace:
        if lora_id is not None:
            return cls(cache_salt or None, (extra_key or "") + lora_id, True)
        return cls(cache_salt or None, extra_key, False)


DEFAULT = CacheNamespace()


def _int64(digest: bytes) -> int:
    return int.from_bytes(digest[:8], "big", signed=True)


def _part(value: str | None) -> bytes:
    if value is None:
        return b"\x00"
    raw = value.encode("utf-8")
    return b"\x01" + len(raw).to_bytes(8, "little") + raw


def first_page_hash(tokens: Sequence[int], page_size: int, ns: CacheNamespace = DEFAULT, dynamo: bool = False) -> int:
    """The published hash of the page `tokens[:page_size]` at the root of namespace `ns`."""
    h = hashlib.sha256()
    if ns.cache_salt is not None:
        h.update(hashlib.sha256(_SALT_TAG + ns.cache_salt.encode("utf-8")).digest())
    h.update(struct.pack(f"<{page_size}I", *tokens[:page_size]))
    block = _int64(h.digest())
    if dynamo:
        extra, salt = ns.extra_key, ns.cache_salt
    else:
        extra, salt = (ns.extra_key if ns.lora else None), None
    if extra is None and salt is None:
        return block
    seed = hashlib.sha256(_NAMESPACE_TAG + _part(extra) + _part(salt)).digest()
    return _int64(hashlib.sha256(seed + block.to_bytes(8, "big", signed=True)).digest())
