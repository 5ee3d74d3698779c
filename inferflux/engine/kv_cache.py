"""Host-side bookkeeping of KV-cache pages: free, shared, and cached for prefix reuse.

The device arrays live with the model runner; this only hands out page ids.
Page 0 is never handed out: it is the null page that padding tokens write
into and that empty block-table entries point at.

Pages are reference counted, so sequences can share them. With prefix
caching, every *full* page a sequence computed is registered under a chained
hash of (parent page's hash, its tokens, adapter id): the same tokens after
the same prefix give the same hash, so a later request with that prefix reuses
the page instead of recomputing it. A released page that holds a registered
prefix is not freed but parked in an LRU list; it is handed out again
(evicted, its hash forgotten) only when no never-cached page is left.

`KVCacheManager` is what the scheduler talks to: it speaks in sequences and
tokens (attach the cached prefix, make room for n more tokens, cache what was
computed, free), so the scheduler never does page arithmetic.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict, deque
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from inferflux.engine.sequence import Sequence as Seq

NULL_PAGE = 0


class OutOfPagesError(RuntimeError):
    """Not enough free pages; the scheduler preempts or waits."""


@dataclasses.dataclass
class PrefixStats:
    queries: int = 0  # full prompt pages looked up
    hits: int = 0  # of those, found in the cache

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


def page_hash(parent: int | None, tokens: Sequence[int], adapter: Hashable = None) -> int:
    """Key of a full page: its tokens, everything before it (through `parent`), and the adapter."""
    return hash((parent, tuple(tokens), adapter))


class PageAllocator:
    def __init__(self, num_pages: int, page_size: int = 16, prefix_caching: bool = True) -> None:
        if num_pages < 2:
            raise ValueError("the KV cache needs at least 2 pages (page 0 is reserved)")
        self.num_pages = num_pages
        self.page_size = page_size
        self.prefix_caching = prefix_caching
        self._free: deque[int] = deque(range(1, num_pages))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached pages nobody uses, oldest first
        self._refs = [0] * num_pages
        self._hash_of: dict[int, int] = {}  # page -> registered hash
        self._page_of: dict[int, int] = {}  # hash -> page
        self._tokens_of: dict[int, tuple[int, ...]] = {}  # page -> its tokens, to rule out hash collisions
        self.stats = PrefixStats()

    @property
    def num_free(self) -> int:
        """Pages that `allocate` can hand out (free plus evictable cached ones)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_usable(self) -> int:
        return self.num_pages - 1

    @property
    def num_used(self) -> int:
        return self.num_usable - self.num_free

    def allocate(self, count: int) -> list[int]:
        """`count` pages, each with one reference; all or nothing."""
        if count > self.num_free:
            raise OutOfPagesError(f"need {count} pages, {self.num_free} free")
        pages = []
        for _ in range(count):
            if self._free:
                page = self._free.popleft()
            else:
                page, _ = self._evictable.popitem(last=False)
                self._forget(page)
            self._refs[page] = 1
            pages.append(page)
        return pages

    def share(self, pages: Sequence[int]) -> None:
        """One more reference to each page (another sequence reads them)."""
        for page in pages:
            if self._refs[page] == 0 and page in self._evictable:
                del self._evictable[page]
            elif self._refs[page] <= 0:
                raise ValueError(f"page {page} is not allocated")
            self._refs[page] += 1

    def release(self, pages: Sequence[int]) -> None:
        """Drop one reference to each page; unused pages become free, or evictable if they hold a prefix."""
        for page in pages:
            if self._refs[page] <= 0:
                raise ValueError(f"page {page} released more often than allocated")
            self._refs[page] -= 1
            if self._refs[page] == 0:
                if page in self._hash_of:
                    self._evictable[page] = None
                else:
                    self._free.append(page)

    def refcount(self, page: int) -> int:
        return self._refs[page]

    def page_states(self) -> list[str]:
        """Each page's state for the /debug map: "null" (page 0), "free", "cached" (a parked prefix nobody
        reads), "prefix" (in use and registered for reuse) or "used". Call on the engine thread."""
        states = ["free"] * self.num_pages
        states[NULL_PAGE] = "null"
        for page in range(1, self.num_pages):
            if self._refs[page] > 0:
                states[page] = "prefix" if page in self._hash_of else "used"
            elif page in self._evictable:
                states[page] = "cached"
        return states

    # --- prefix caching ---

    def match_prefix(self, tokens: Sequence[int], adapter: Hashable = None, limit: int | None = None) -> list[int]:
        """Cached pages holding the leading full pages of `tokens`, each shared once for the caller.

        At most `limit` pages; the caller must leave at least one token to compute (its logits are needed).
        """
        if not self.prefix_caching:
            return []
        full = len(tokens) // self.page_size if limit is None else min(limit, len(tokens) // self.page_size)
        pages: list[int] = []
        parent = None
        for i in range(full):
            chunk = tuple(tokens[i * self.page_size:(i + 1) * self.page_size])
            parent = page_hash(parent, chunk, adapter)
            self.stats.queries += 1
            page = self._page_of.get(parent)
            if page is None or self._tokens_of.get(page) != chunk:
                self.stats.queries += full - i - 1  # the rest of the prompt's pages miss too
                break
            self.stats.hits += 1
            pages.append(page)
        self.share(pages)
        return pages

    def register(self, pages: Sequence[int], tokens: Sequence[int], num_computed: int,
                 hashes: list[int], adapter: Hashable = None) -> None:
        """Register the full, computed pages of a sequence that are not registered yet.

        `hashes` is the sequence's running list of page hashes (extended in place), so
        each page is hashed once over the sequence's life.
        """
        if not self.prefix_caching:
            return
        for i in range(len(hashes), num_computed // self.page_size):
            chunk = tuple(tokens[i * self.page_size:(i + 1) * self.page_size])
            h = page_hash(hashes[-1] if hashes else None, chunk, adapter)
            hashes.append(h)
            page = pages[i]
            if h not in self._page_of and page not in self._hash_of:
                self._page_of[h] = page
                self._hash_of[page] = h
                self._tokens_of[page] = chunk

    def _forget(self, page: int) -> None:
        h = self._hash_of.pop(page, None)
        if h is not None and self._page_of.get(h) == page:
            del self._page_of[h]
        self._tokens_of.pop(page, None)


class KVCacheManager:
    """The KV cache as the scheduler sees it: per-sequence pages over one `PageAllocator` (nano-vllm's
    block manager). Every call keeps `seq.pages` and `seq.num_computed` consistent with the allocator's
    reference counts: a page is referenced once per sequence that lists it, and `free` drops exactly those.
    """

    def __init__(self, allocator: PageAllocator) -> None:
        self.allocator = allocator
        self.page_size = allocator.page_size

    def attach_prefix(self, seq: Seq) -> int:
        """Start a sequence that holds no pages after the cached full pages of its tokens; returns the
        tokens found in the cache.

        At least one token always stays to compute, since its logits pick the next token. A sequence
        that needs every position computed (prompt logprobs score each position's logits, an embedding
        pools each position's hidden state) takes nothing from the cache.
        """
        if seq.pages:
            raise ValueError(f"sequence {seq.seq_id} already holds pages")
        tokens = seq.all_ids
        limit = 0 if seq.computes_every_position else (len(tokens) - 1) // self.page_size
        seq.pages = self.allocator.match_prefix(tokens, seq.adapter, limit=limit)
        seq.num_computed = len(seq.pages) * self.page_size
        return seq.num_computed

    def allocate(self, seq: Seq, num_new: int) -> bool:
        """Make the sequence's pages cover its next `num_new` tokens, all or nothing; False when the
        cache has too few free pages (the sequence's pages are then unchanged)."""
        needed = -(-(seq.num_computed + num_new) // self.page_size) - len(seq.pages)
        if needed <= 0:
            return True
        if needed > self.allocator.num_free:
            return False
        seq.pages = seq.pages + self.allocator.allocate(needed)
        return True

    def cache_computed(self, seq: Seq) -> None:
        """Register the sequence's full, computed pages for prefix reuse (after its step ran).

        An embedding's pages are never registered: its input is rarely a later prompt, and parked
        pages of one-off inputs would push useful prefixes (system prompts) out of the LRU.
        """
        if not seq.is_embedding:
            self.allocator.register(seq.pages, seq.all_ids, seq.num_computed, seq.page_hashes, seq.adapter)

    def rollback(self, seq: Seq, num_computed: int) -> None:
        """Take back computed positions (speculative tokens that were rejected): the sequence's K/V now ends
        at `num_computed`, and pages wholly past it are released. Those pages were never registered (only
        full, computed pages are), and stale K/V left in the kept last page is overwritten before it counts."""
        if num_computed > seq.num_computed:
            raise ValueError(f"rollback to {num_computed} is past the {seq.num_computed} tokens computed")
        seq.num_computed = num_computed
        self.trim(seq, 0)

    def trim(self, seq: Seq, num_new: int) -> None:
        """Release the pages wholly past the sequence's next `num_new` tokens (allocated for proposals that
        did not come, or taken back by `rollback`)."""
        keep = -(-(seq.num_computed + num_new) // self.page_size)
        if len(seq.pages) > keep:
            self.allocator.release(seq.pages[keep:])
            seq.pages = seq.pages[:keep]

    def free(self, seq: Seq) -> None:
        """Drop the sequence's references (full registered pages stay cached) and reset it to uncomputed,
        so a preempted sequence is later recomputed from its first token."""
        if seq.pages:
            self.allocator.release(seq.pages)
        seq.pages = []
        seq.page_hashes = []
        seq.num_computed = 0
