"""Page allocator (free list, reference counts, the reserved null page) and the scheduler's KVCacheManager."""

from __future__ import annotations

import pytest

from inferflux.engine.kv_cache import NULL_PAGE, KVCacheManager, OutOfPagesError, PageAllocator
from inferflux.engine.sampling_params import SamplingParams
from inferflux.engine.sequence import Sequence


def test_allocate_release_and_null_page() -> None:
    alloc = PageAllocator(5)
    assert alloc.num_usable == 4 and alloc.num_free == 4
    pages = alloc.allocate(4)
    assert NULL_PAGE not in pages and sorted(pages) == [1, 2, 3, 4]
    with pytest.raises(OutOfPagesError):
        alloc.allocate(1)
    alloc.release(pages[:2])
    assert alloc.num_free == 2
    again = alloc.allocate(2)
    assert set(again) == set(pages[:2])


def test_all_or_nothing() -> None:
    alloc = PageAllocator(4)
    with pytest.raises(OutOfPagesError):
        alloc.allocate(4)
    assert alloc.num_free == 3


def test_shared_pages_free_on_last_release() -> None:
    alloc = PageAllocator(4)
    pages = alloc.allocate(2)
    alloc.share(pages)
    assert [alloc.refcount(p) for p in pages] == [2, 2]
    alloc.release(pages)
    assert alloc.num_free == 1
    alloc.release(pages)
    assert alloc.num_free == 3
    with pytest.raises(ValueError, match="released more often"):
        alloc.release(pages[:1])
    with pytest.raises(ValueError, match="not allocated"):
        alloc.share([3])


# --- KVCacheManager: what the scheduler asks of the cache ---

PAGE = 4


def seq(tokens: list[int], **kwargs) -> Sequence:
    params = kwargs.pop("params", SamplingParams())
    return Sequence(list(tokens), params, seed=0, max_model_len=1000, **kwargs)


def computed(kv: KVCacheManager, s: Sequence, n: int) -> None:
    """What the engine does around a step: pages for `n` tokens, the step ran, its full pages cached."""
    assert kv.allocate(s, n)
    s.num_computed += n
    kv.cache_computed(s)


def test_manager_allocates_all_or_nothing_and_frees() -> None:
    alloc = PageAllocator(6, page_size=PAGE)  # 5 usable pages
    kv = KVCacheManager(alloc)
    a = seq(range(1, 11))  # 10 tokens: 3 pages
    assert kv.attach_prefix(a) == 0 and a.pages == []  # nothing cached yet
    assert kv.allocate(a, 10) and len(a.pages) == 3 and alloc.num_free == 2
    assert kv.allocate(a, 2) and len(a.pages) == 3  # the last page has room for 2 more: no new page
    b = seq(range(50, 63))  # 13 tokens: 4 pages, only 2 free
    assert not kv.allocate(b, 13)
    assert b.pages == [] and alloc.num_free == 2  # all or nothing: nothing was taken
    assert kv.allocate(b, 8) and alloc.num_free == 0
    kv.free(a)
    assert (a.pages, a.num_computed, a.page_hashes) == ([], 0, [])
    kv.free(b)
    kv.free(b)  # freeing a sequence that holds nothing is a no-op, not a double release
    assert alloc.num_free == alloc.num_usable


def test_manager_shares_cached_prefix_with_ref_counts() -> None:
    alloc = PageAllocator(12, page_size=PAGE)
    kv = KVCacheManager(alloc)
    prompt = list(range(1, 11))  # 2 full pages + 2 tokens
    first = seq(prompt)
    kv.attach_prefix(first)
    computed(kv, first, 10)
    assert len(first.page_hashes) == 2  # the two full pages are registered, the partial one is not
    second = seq(prompt + [99])
    assert kv.attach_prefix(second) == 8  # both full pages found
    assert second.pages == first.pages[:2] and [alloc.refcount(p) for p in second.pages] == [2, 2]
    assert alloc.stats.hits == 2
    same = seq(prompt[:8])  # exactly two full pages: the last token must still run, so only one is taken
    assert kv.attach_prefix(same) == 4 and alloc.refcount(first.pages[0]) == 3
    kv.free(first)
    assert [alloc.refcount(p) for p in second.pages] == [2, 1]  # `same` still reads the first
    computed(kv, second, 3)
    kv.free(second)
    kv.free(same)
    assert alloc.num_free == alloc.num_usable  # no leaks; the cached pages are parked, not lost
    again = seq(prompt)
    assert kv.attach_prefix(again) == 8  # still cached after everyone released them
    kv.free(again)


def test_manager_every_position_sequences_bypass_the_cache() -> None:
    alloc = PageAllocator(12, page_size=PAGE)
    kv = KVCacheManager(alloc)
    prompt = list(range(1, 14))
    warm = seq(prompt)
    kv.attach_prefix(warm)
    computed(kv, warm, 13)
    kv.free(warm)
    queries = alloc.stats.queries
    scored = seq(prompt, params=SamplingParams(prompt_logprobs=2))  # needs every position's logits
    assert scored.computes_every_position and kv.attach_prefix(scored) == 0 and scored.pages == []
    embedding = seq(prompt, pooling="mean")  # needs every position's hidden state
    assert kv.attach_prefix(embedding) == 0
    assert alloc.stats.queries == queries  # neither counts as a prefix-cache miss
    other = seq(list(range(200, 213)), pooling="last")
    kv.attach_prefix(other)
    computed(kv, other, 13)
    assert other.page_hashes == []  # an embedding's pages are never registered
    kv.free(other)
    probe = seq(list(range(200, 213)))
    assert kv.attach_prefix(probe) == 0
    for s in (scored, embedding, probe):
        kv.free(s)
    assert alloc.num_free == alloc.num_usable
    with pytest.raises(ValueError, match="already holds pages"):
        busy = seq(prompt)
        kv.allocate(busy, 1)
        kv.attach_prefix(busy)


def test_pages_from_memory_keep_their_shape_across_small_changes() -> None:
    """A KV cache sized from free memory is rounded to 4 leading bits (engine/device.py coarse_count), so a
    restart with a little more or less free memory compiles the same programs (the caches then hit)."""
    import os
    import random

    from inferflux.engine import device

    rng = random.Random(0)
    for _ in range(2000):
        n = rng.randrange(1, 1 << 20)
        c = device.coarse_count(n)
        assert 0.875 * n <= c <= n
        assert len(bin(c)[2:].rstrip("0")) <= 4  # 4 leading binary digits, zeros after
    assert device.coarse_count(12_300) == device.coarse_count(13_300) == 12_288  # 8% apart: one shape
    assert [device.coarse_count(n) for n in (1, 7, 15, 16, 17, 31, 33)] == [1, 7, 15, 16, 16, 30, 32]
    # Available memory counts reclaimable page cache, so it is at least the plain free pages.
    assert device.free_memory_bytes() >= os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 0.9


def test_room_kept_for_proposals_is_given_back_before_anyone_is_preempted() -> None:
    """A batched proposer's room (pages and budget kept while the others are scheduled) is dropped when a later
    running sequence is short of pages, instead of preempting a sequence; unused room is trimmed."""
    from inferflux.engine.scheduler import Scheduler

    class Room:  # proposes nothing, but keeps room for 8 tokens per decoding sequence, like a draft model
        batched = True

        def room(self, seq: Sequence, budget: int) -> int:
            return min(8, budget)

        def propose(self, items):
            return [[] for _ in items]

    kv = KVCacheManager(PageAllocator(5, page_size=4))  # 4 usable pages
    scheduler = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=64)
    scheduler.proposer = Room()
    seqs = []
    # The first decodes into its first page (room for 8 more: 2 more pages, the last free ones); the second's
    # next token starts a page, so it needs one that only the first's room can give.
    for prompt in ([1, 2, 3], [4, 5, 6, 7]):
        seq = Sequence(prompt + [9], SamplingParams(max_tokens=20), seed=0, max_model_len=64)
        seq.num_computed = len(prompt)
        assert kv.allocate(seq, 0) and len(seq.pages) == 1
        seqs.append(seq)
    scheduler.running = list(seqs)
    chunks = scheduler.schedule()
    assert [c.seq for c in chunks] == seqs and scheduler.num_preemptions == 0
    assert all(c.draft == [] for c in chunks)
    assert [len(s.pages) for s in seqs] == [1, 2]  # the room not filled is given back
    assert kv.allocator.num_free == 1
