from __future__ import annotations

import pytest

from fovea.scheduler.radix_cache import RadixCache


def test_insert_match_split_page_size_1() -> None:
    c = RadixCache(page_size=1)
    assert c.insert([1, 2, 3], [10, 11, 12]) == 0
    slots, node = c.match_prefix([1, 2, 3, 4])
    assert slots == [10, 11, 12]
    assert node.key == [1, 2, 3]
    # A branch at token 3: [1, 2] is already present, only [4] is new.
    assert c.insert([1, 2, 4], [20, 21, 22]) == 2
    assert c.total_size == 4
    assert c.match_prefix([1, 2, 4])[0] == [10, 11, 22]
    assert c.match_prefix([1, 2, 3])[0] == [10, 11, 12]
    # A match that ends inside a node splits it: the node returned covers exactly [1].
    slots, node = c.match_prefix([1, 9])
    assert slots == [10]
    assert node.key == [1]
    assert c.match_prefix([5])[0] == []
    assert c.insert([1, 2, 3], [30, 31, 32]) == 3
    assert (c.total_size, c.evictable_size, c.protected_size) == (4, 4, 0)


def test_lock_protects_path_and_eviction_is_lru_over_leaves() -> None:
    c = RadixCache(page_size=1)
    c.insert([1, 2, 3], [10, 11, 12])
    c.insert([1, 2, 4, 5], [10, 11, 13, 14])
    c.insert([7, 8], [15, 16])
    # Tree: [1,2] -> {[3], [4,5]}, [7,8]. Touch [1,2,3] so [4,5] and [7,8] are older.
    _, node3 = c.match_prefix([1, 2, 3])
    c.inc_lock(node3)
    assert (c.evictable_size, c.protected_size) == (4, 3)
    # Oldest unlocked leaf first: [4,5] (inserted before [7,8]), and of it only the tail
    # needed; the locked path stays.
    assert c.evict(1) == [14]
    assert c.match_prefix([1, 2, 4, 5])[0] == [10, 11, 13]
    assert c.evict(10) == [15, 16, 13]
    assert (c.evictable_size, c.protected_size) == (0, 3)
    assert c.match_prefix([1, 2, 3])[0] == [10, 11, 12]
    c.dec_lock(node3)
    assert (c.evictable_size, c.protected_size) == (3, 0)
    # Leaf [3] goes, then its parent [1,2] becomes a leaf and goes too.
    assert c.evict(3) == [12, 10, 11]
    assert c.total_size == 0
    assert c.match_prefix([1, 2, 3])[0] == []


def test_split_keeps_lock_counts() -> None:
    c = RadixCache(page_size=1)
    c.insert([1, 2, 3, 4], [5, 6, 7, 8])
    _, node = c.match_prefix([1, 2, 3, 4])
    c.inc_lock(node)
    # Inserting a branch splits the locked node; the whole path stays protected.
    assert c.insert([1, 2, 9], [5, 6, 9]) == 2
    assert (c.evictable_size, c.protected_size) == (1, 4)
    assert c.evict(10) == [9]
    c.dec_lock(node)
    assert (c.evictable_size, c.protected_size) == (4, 0)
    with pytest.raises(RuntimeError, match="dec_lock on an unlocked node"):
        c.dec_lock(node)


def test_page_size_4_matches_and_splits_on_page_boundaries() -> None:
    c = RadixCache(page_size=4)
    assert c.insert(list(range(8)), list(range(100, 108))) == 0
    # 7 tokens match page-aligned: only the first page.
    slots, node = c.match_prefix(list(range(7)))
    assert slots == [100, 101, 102, 103]
    assert node.key == [0, 1, 2, 3]
    # Differs inside the second page: only the first page is shared.
    assert c.insert([0, 1, 2, 3, 4, 5, 9, 9], [100, 101, 102, 103, 200, 201, 202, 203]) == 4
    assert c.match_prefix([0, 1, 2, 3, 4, 5, 9, 9])[0] == [100, 101, 102, 103, 200, 201, 202, 203]
    assert c.total_size == 12
    assert c.evict(1) == [104, 105, 106, 107]
    # Eviction takes whole pages from the tail of a leaf: 5 tokens -> 2 pages.
    c = RadixCache(page_size=4)
    c.insert(list(range(12)), list(range(100, 112)))
    assert c.evict(5) == list(range(104, 112))
    assert c.match_prefix(list(range(12)))[0] == [100, 101, 102, 103]
    assert (c.total_size, c.evictable_size) == (4, 4)
    with pytest.raises(ValueError, match="insert: 3 tokens is not a multiple of the page size"):
        c.insert([1, 2, 3], [4, 5, 6])


def test_disabled_cache_caches_nothing() -> None:
    c = RadixCache(page_size=1, disabled=True)
    assert c.insert([1, 2, 3], [10, 11, 12]) == 3  # "all present": the caller frees all
    slots, node = c.match_prefix([1, 2, 3])
    assert (slots, node) == ([], c.root)
    c.inc_lock(node)
    c.dec_lock(node)
    assert (c.total_size, c.evict(10)) == (0, [])
