import random

from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_kvmul.mirror import RadixMirror, namespace_of


def _chain(mirror: RadixMirror, tokens, parent, first_hash):
    """Store `tokens` (whole pages) under `parent`, hashes first_hash, first_hash+1, ..."""
    n = len(tokens) // mirror.page_size
    hashes = list(range(first_hash, first_hash + n))
    assert mirror.store(hashes, parent, tokens)
    return hashes


def test_match_follows_stored_pages_page_size_1():
    m = RadixMirror(1)
    h = _chain(m, [1, 2, 3, 4], None, 100)
    assert m.match([1, 2, 3, 4, 5]) == 4
    assert m.match([1, 2, 9]) == 2
    assert m.match([9]) == 0
    _chain(m, [5, 6], h[-1], 200)
    assert m.match([1, 2, 3, 4, 5, 6, 7]) == 6
    assert m.match([1, 2, 3, 4, 5, 6, 7], limit=5) == 5
    assert m.num_tokens == 6


def test_match_is_page_granular():
    m = RadixMirror(4)
    _chain(m, list(range(12)), None, 1)
    assert m.match(list(range(12))) == 12
    assert m.match(list(range(11))) == 8  # the third page is incomplete in the prompt
    assert m.match([0, 1, 2, 3, 4, 5, 99, 7]) == 4


def test_remove_drops_the_page_and_everything_below_it():
    m = RadixMirror(1)
    h = _chain(m, [1, 2, 3], None, 10)
    _chain(m, [4, 5], h[-1], 20)
    assert m.remove([20, 21]) == 2
    assert m.match([1, 2, 3, 4, 5]) == 3
    assert m.remove([12]) == 1
    assert m.match([1, 2, 3]) == 2
    assert m.remove([999]) == 0


def test_clear_and_namespaces():
    m = RadixMirror(1)
    salted = namespace_of("salt", None)
    assert namespace_of("", None) == namespace_of(None, None)
    assert m.store([1, 2], None, [7, 8], salted)
    assert m.match([7, 8, 9]) == 0
    assert m.match([7, 8, 9], salted) == 2
    m.clear()
    assert m.match([7, 8, 9], salted) == 0
    assert m.num_pages == 0


def test_store_with_unknown_parent_is_refused_and_counted():
    m = RadixMirror(1)
    assert not m.store([5], 12345, [1])
    assert m.orphan_blocks == 1
    assert m.match([1]) == 0


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=0, max_value=2**31), st.sampled_from([1, 2, 4]))
def test_random_inserts_and_evictions_match_a_reference_set(seed, page_size):
    """Against a plain set of cached page-paths: match = longest prefix whose pages are all cached."""
    rng = random.Random(seed)
    m = RadixMirror(page_size)
    cached: dict[tuple, int] = {}  # page-aligned prefix -> hash of its last page
    next_hash = 1
    for _ in range(40):
        prompt = [rng.randrange(3) for _ in range(page_size * rng.randrange(1, 6))]
        if rng.random() < 0.7:
            # insert the uncached tail of `prompt`, as SGLang would after a prefill
            done = 0
            while done < len(prompt) and tuple(prompt[: done + page_size]) in cached:
                done += page_size
            if done < len(prompt):
                parent = cached[tuple(prompt[:done])] if done else None
                tail = prompt[done:]
                hashes = list(range(next_hash, next_hash + len(tail) // page_size))
                next_hash += len(hashes)
                m.store(hashes, parent, tail)
                for i, h in enumerate(hashes):
                    cached[tuple(prompt[: done + (i + 1) * page_size])] = h
        else:
            # evict one leaf page (SGLang evicts leaves only)
            leaves = [k for k in cached if not any(len(o) > len(k) and o[: len(k)] == k for o in cached)]
            if leaves:
                leaf = rng.choice(leaves)
                m.remove([cached.pop(leaf)])
        query = [rng.randrange(3) for _ in range(page_size * 6)]
        expect = 0
        while tuple(query[: expect + page_size]) in cached and expect < len(query):
            expect += page_size
        assert m.match(query) == expect
        assert m.num_pages == len(cached)
