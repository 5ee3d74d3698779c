"""Page allocator: free list, reference counts, the reserved null page."""

from __future__ import annotations

import pytest

from inferflux.engine.kv_cache import NULL_PAGE, OutOfPagesError, PageAllocator


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
