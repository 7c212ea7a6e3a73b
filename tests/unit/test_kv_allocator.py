from __future__ import annotations

import pytest

from fovea.scheduler.kv_allocator import KVAllocator


def test_page_size_1_hands_out_lowest_slots_and_never_the_scratch_slot() -> None:
    a = KVAllocator(num_slots=8, page_size=1)
    assert (a.total_slots, a.available) == (8, 8)
    assert a.extend([], 3) == [1, 2, 3]
    assert a.allocate_pages(2) == [4, 5]
    assert a.available == 3
    a.free([2, 4])
    assert a.available == 5
    # Freed slots come back lowest first.
    assert a.extend([1], 3) == [2, 4, 6]
    assert a.extend([], 3) is None  # only 7 and 8 left: nothing taken
    assert a.available == 2
    assert a.allocate_pages(2) == [7, 8]
    assert a.available == 0


def test_page_size_4_fills_the_last_page_before_taking_a_new_one() -> None:
    a = KVAllocator(num_slots=18, page_size=4)  # 4 usable pages: slots 4..19
    assert (a.num_pages, a.total_slots) == (4, 16)
    held = a.extend([], 5)
    assert held == [4, 5, 6, 7, 8]  # page 1 whole, 1 slot of page 2
    assert a.available == 8
    assert a.slots_needed(5, 3) == 0  # fits in page 2
    assert a.slots_needed(5, 4) == 4
    more = a.extend(held, 4)
    assert more == [9, 10, 11, 12]
    assert a.available == 4
    a.free([12])  # the partial page 3
    assert a.available == 8
    assert a.extend([], 8) == [12, 13, 14, 15, 16, 17, 18, 19]
    assert a.extend([], 1) is None


def test_free_rejects_double_free_and_scratch_slots() -> None:
    a = KVAllocator(num_slots=4, page_size=2)
    slots = a.extend([], 2)
    assert slots == [2, 3]
    a.free(slots)
    with pytest.raises(ValueError, match="page 1 freed twice"):
        a.free([2])
    with pytest.raises(ValueError, match="slot page 0 is not a usable page"):
        a.free([1])


def test_rejects_pool_smaller_than_a_page() -> None:
    with pytest.raises(ValueError, match="num_slots 3 is less than one page of 4"):
        KVAllocator(num_slots=3, page_size=4)
