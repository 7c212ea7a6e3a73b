"""KV slot allocator: the scheduler hands out slot ids, the workers own the tensors.

Slot-id convention (the workers rely on it): a worker's pool has `num_slots + page_size` rows.
Slots `0..page_size-1` are the workers' scratch page (padding writes land there) and are never
handed out. Usable pages are `1..num_pages` (`num_pages = num_slots // page_size`), and a page
holds slots `page * page_size + offset` for `offset` in `0..page_size-1`.

Ownership: every page is owned by exactly one sequence or by the radix cache. A sequence's
slots fill its pages in order, so only its last page may be partly used; `free` returns whole
pages and so must only be given slots whose pages the caller owns outright.

Order is deterministic (lowest free page first), so tests can assert exact slot ids.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable


class KVAllocator:
    def __init__(self, num_slots: int, page_size: int) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        if num_slots < page_size:
            raise ValueError(f"num_slots {num_slots} is less than one page of {page_size}")
        self.page_size = page_size
        self.num_pages = num_slots // page_size
        self._free_heap: list[int] = list(range(1, self.num_pages + 1))
        self._free_set: set[int] = set(self._free_heap)

    @property
    def total_slots(self) -> int:
        return self.num_pages * self.page_size

    @property
    def available(self) -> int:
        """Free slots (always whole pages)."""
        return len(self._free_heap) * self.page_size

    def allocate_pages(self, n: int) -> list[int] | None:
        """`n` page ids, lowest first; None (and nothing taken) if fewer are free."""
        if n > len(self._free_heap):
            return None
        pages = [heapq.heappop(self._free_heap) for _ in range(n)]
        self._free_set.difference_update(pages)
        return pages

    def slots_needed(self, num_held: int, n: int) -> int:
        """Fresh slots (whole pages) that `n` more tokens of a sequence holding `num_held`
        slots take: its last page's free offsets are used first."""
        room_in_last = -num_held % self.page_size
        rest = max(0, n - room_in_last)
        return -(-rest // self.page_size) * self.page_size

    def extend(self, held: list[int], n: int) -> list[int] | None:
        """`n` more slots for a sequence whose slots so far are `held` (in token order): the
        free offsets of its last page, then new pages. None (nothing taken) if out of pages."""
        ps = self.page_size
        room_in_last = -len(held) % ps
        take = min(n, room_in_last)
        out = [held[-1] + 1 + i for i in range(take)] if take else []
        rest = n - take
        pages = self.allocate_pages(-(-rest // ps))
        if pages is None:
            return None
        out.extend(p * ps + off for p in pages for off in range(ps))
        del out[n:]
        return out

    def free(self, slots: Iterable[int]) -> None:
        """Return the pages holding `slots` (each page once, whole)."""
        for page in dict.fromkeys(s // self.page_size for s in slots):
            if not 1 <= page <= self.num_pages:
                raise ValueError(f"slot page {page} is not a usable page")
            if page in self._free_set:
                raise ValueError(f"page {page} freed twice")
            self._free_set.add(page)
            heapq.heappush(self._free_heap, page)
