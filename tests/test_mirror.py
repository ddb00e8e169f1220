"""The mirror's page tree, fed by SGLang's real radix cache and its real KV events."""

import itertools
import random

import pytest
from helpers import via_wire
from hypothesis import given, settings
from hypothesis import strategies as st
from sglang_cache import SGLangCache

from sglang_kvmul.core.block_hash import DEFAULT, CacheNamespace, first_page_hash
from sglang_kvmul.core.events import AllBlocksCleared, BlockRemoved, BlockStored
from sglang_kvmul.core.mirror import RadixMirror
from sglang_kvmul.core.radix_index import SharedRadixIndex


def mirror_of(sg: SGLangCache, page_size: int, mirror: RadixMirror | None = None) -> RadixMirror:
    mirror = mirror or RadixMirror(page_size)
    for ev in via_wire(sg.take_events()):
        if type(ev) is BlockStored:
            assert mirror.store(ev.block_hashes, ev.parent_block_hash, ev.token_ids)
        elif type(ev) is BlockRemoved:
            mirror.remove(ev.block_hashes)
        else:
            assert type(ev) is AllBlocksCleared
            mirror.clear()
    return mirror


def root(tokens, page_size, ns=DEFAULT, dynamo=False):
    return first_page_hash(tokens, page_size, ns, dynamo) if len(tokens) >= page_size else None


def test_match_follows_stored_pages_page_size_1():
    sg = SGLangCache(1)
    sg.insert([1, 2, 3, 4])
    sg.insert([1, 2, 3, 4, 5, 6])
    m = mirror_of(sg, 1)
    q = [1, 2, 3, 4, 5, 6, 7]
    assert m.match(q, root(q, 1)) == 6
    assert m.match(q, root(q, 1), limit=5) == 5
    assert m.match([1, 2, 9], root([1], 1)) == 2
    assert m.match([9], root([9], 1)) == 0
    assert m.num_tokens == 6


def test_match_is_page_granular():
    sg = SGLangCache(4)
    sg.insert(list(range(12)))
    m = mirror_of(sg, 4)
    r = root(list(range(4)), 4)
    assert m.match(list(range(12)), r) == 12
    assert m.match(list(range(11)), r) == 8  # the third page is incomplete in the prompt
    assert m.match([0, 1, 2, 3, 4, 5, 99, 7], r) == 4
    assert m.match([0, 1, 2], r) == 0  # shorter than a page


def test_remove_drops_the_page_and_everything_below_it():
    m = RadixMirror(1)
    r = root([1], 1)
    assert m.store([r, 11, 12], None, [1, 2, 3])
    assert m.store([20, 21], 12, [4, 5])
    assert m.remove([20, 21]) == 2
    assert m.match([1, 2, 3, 4, 5], r) == 3
    assert m.remove([11]) == 2
    assert m.match([1, 2, 3], r) == 1
    assert m.remove([999]) == 0


def test_store_with_unknown_parent_is_refused_and_counted():
    m = RadixMirror(1)
    assert not m.store([5], 12345, [1])
    assert m.orphan_blocks == 1
    assert m.match([1], root([1], 1)) == 0


@pytest.mark.parametrize("dynamo", [False, True])
def test_namespaces_are_separate_subtrees(dynamo):
    lora = CacheNamespace.of_request(None, None, "L1")
    ns = [CacheNamespace(), CacheNamespace("salt-a"), lora]
    if dynamo:
        ns.append(CacheNamespace(extra_key="tenant-x"))
    sg = SGLangCache(1, dynamo=dynamo, lora_ids=("L1",))
    tokens = [7, 8, 9, 10]
    sg.insert(tokens, ns[1])
    m = mirror_of(sg, 1)
    for n in ns:
        expect = 4 if n == ns[1] else 0
        assert m.match(tokens, root(tokens, 1, n, dynamo)) == expect == sg.match(tokens, n)


OPS = ("insert", "insert", "insert", "evict", "flush_rarely")


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**31), page_size=st.sampled_from([1, 16]), dynamo=st.booleans())
def test_mirror_equals_sglang_match_prefix_after_every_step(seed, page_size, dynamo):
    """Random inserts, evictions and flushes in SGLang's RadixCache; after every step the mirror's
    match equals SGLang's match_prefix for prompts in every namespace (plain, salted, LoRA, and
    extra_key in the dynamo format)."""
    rng = random.Random(seed)
    namespaces = [CacheNamespace(), CacheNamespace("s1"), CacheNamespace.of_request(None, None, "L1")]
    if dynamo:
        namespaces.append(CacheNamespace(extra_key="tenant"))
    sg = SGLangCache(page_size, dynamo=dynamo, lora_ids=("L1",))
    m = mirror_of(sg, page_size)
    stems = [[rng.randrange(5) for _ in range(page_size * 4)] for _ in range(3)]

    def prompt():
        stem = rng.choice(stems)[: page_size * rng.randrange(1, 5)]
        return stem + [rng.randrange(5) for _ in range(rng.randrange(0, 3 * page_size))]

    for _ in range(30):
        op = rng.choice(OPS)
        if op == "insert":
            sg.insert(prompt(), rng.choice(namespaces))
        elif op == "evict":
            sg.evict(rng.randrange(1, 4) * page_size)
        elif rng.random() < 0.2:
            sg.flush()
        m = mirror_of(sg, page_size, m)
        for _ in range(4):
            q, ns = prompt(), rng.choice(namespaces)
            expect = sg.match(q, ns)
            assert m.match(q, root(q, page_size, ns, dynamo)) == expect, (q, ns)
    assert m.orphan_blocks == 0


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**31), page_size=st.sampled_from([1, 4]), dynamo=st.booleans())
def test_shared_index_equals_every_ranks_sglang_cache(seed, page_size, dynamo):
    """Three ranks, each a real SGLang RadixCache, feeding ONE shared index: shared stems make
    ranks share, split and drop segments. After every step, one `match_all` walk gives each
    rank exactly its own cache's match_prefix."""
    rng = random.Random(seed)
    namespaces = [CacheNamespace(), CacheNamespace("s1")]
    caches = [SGLangCache(page_size, dynamo=dynamo) for _ in range(3)]
    index = SharedRadixIndex(3, page_size)
    mirrors = [RadixMirror(page_size, index, r) for r in range(3)]
    stems = [[rng.randrange(4) for _ in range(page_size * 6)] for _ in range(3)]

    def prompt():
        stem = rng.choice(stems)[: page_size * rng.randrange(1, 7)]
        return stem + [rng.randrange(4) for _ in range(rng.randrange(0, 3 * page_size))]

    for _ in range(40):
        r = rng.randrange(3)
        op = rng.choice(OPS)
        if op == "insert":
            caches[r].insert(prompt(), rng.choice(namespaces))
        elif op == "evict":
            caches[r].evict(rng.randrange(1, 4) * page_size)
        elif rng.random() < 0.2:
            caches[r].flush()
        mirror_of(caches[r], page_size, mirrors[r])
        for _ in range(4):
            q, ns = prompt(), rng.choice(namespaces)
            got = index.match_all(q, root(q, page_size, ns, dynamo))
            assert got == [c.match(q, ns) for c in caches], (q, ns)
        index.check()
    assert index.orphan_blocks == [0, 0, 0]


def test_shared_index_frees_segments_no_rank_holds():
    index = SharedRadixIndex(2, 1)
    r = root([1], 1)
    assert index.store(0, [r, 11, 12], None, [1, 2, 3])
    assert index.store(1, [r, 11], None, [1, 2])  # rank 1 holds a prefix: the segment splits
    assert index.match_all([1, 2, 3, 4], r) == [3, 2]
    assert index.remove(0, [r]) == 3
    assert index.match_all([1, 2, 3], r) == [0, 2]
    index.clear(1)
    assert index.num_segments == 0 and index.pages == [0, 0]


def test_stem_is_where_cached_prompts_branch():
    """A system prompt two sessions extend: a new prompt on it has the system prompt as its stem and
    its whole hit; a session's next turn hits past the stem (its own context); a prompt nothing
    else shares has no stem."""
    index = SharedRadixIndex(2, 1)
    system, a, b = [1, 2, 3], [4, 5], [6, 7]
    for rank, tokens in ((0, system + a), (1, system + b)):
        hashes = [root(tokens, 1)] + [100 * rank + i for i in range(1, len(tokens))]
        assert index.store(rank, hashes, None, tokens)
    r = root(system, 1)
    assert index.match_all_stem([*system, 9], r) == ([3, 3], 3)
    assert index.match_all_stem([*system, *a, 9], r) == ([5, 3], 3)
    lone = [8, 8]
    assert index.store(0, [root(lone, 1), 300], None, lone)
    assert index.match_all_stem([*lone, 9], root(lone, 1)) == ([2, 0], 0)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**31), page_size=st.sampled_from([1, 2]))
def test_stem_equals_its_definition_on_real_sglang_caches(seed, page_size):
    """Three real SGLang RadixCaches feeding one index, random inserts and evictions: the walk's stem
    is, by definition, the longest page-aligned prefix of the prompt within its best hit at which
    two different next pages are cached (on any rank), found here by asking the caches."""
    rng = random.Random(seed)
    caches = [SGLangCache(page_size) for _ in range(3)]
    index = SharedRadixIndex(3, page_size)
    mirrors = [RadixMirror(page_size, index, r) for r in range(3)]
    stems = [[rng.randrange(4) for _ in range(page_size * 6)] for _ in range(2)]
    pages = [list(p) for p in itertools.product(range(4), repeat=page_size)]

    def prompt():
        return rng.choice(stems)[: page_size * rng.randrange(1, 7)] + [rng.randrange(4) for _ in range(3 * page_size)]

    def stem_by_definition(q):
        hit = max(c.match(q) for c in caches)
        for end in range(hit, 0, -page_size):
            nexts = [p for p in pages if any(c.match(q[:end] + p) >= end + page_size for c in caches)]
            if len(nexts) >= 2:
                return end
        return 0

    for _ in range(30):
        r = rng.randrange(3)
        if rng.random() < 0.8:
            caches[r].insert(prompt())
        else:
            caches[r].evict(rng.randrange(1, 4) * page_size)
        mirror_of(caches[r], page_size, mirrors[r])
        for _ in range(3):
            q = prompt()
            assert index.match_all_stem(q, root(q, page_size))[1] == stem_by_definition(q), q
