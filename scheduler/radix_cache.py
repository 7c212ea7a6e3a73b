"""Radix tree over token ids: the prefix cache. Key = token ids, value = their KV slot ids.

Contract:
- Granularity is the page: `match_prefix` returns a page-aligned prefix, `insert` takes a
  page-aligned key, nodes split only at page boundaries, so eviction frees whole pages.
- Who may lock: a sequence that uses a matched prefix locks the node `match_prefix` returned
  (`inc_lock`) for as long as it holds those slots, and unlocks it (`dec_lock`) exactly once
  when it releases them (finish, abort, retraction). A lock counts on the node and every
  ancestor up to the root, so a locked node's whole prefix is protected.
- When refs drop: `dec_lock` moves a path's tokens from `protected_size` back to
  `evictable_size` as each node's count reaches zero. Slots stay in the tree until evicted.
- What eviction may touch: only leaves with no lock, least recently used first (a match or an
  insert through a node marks it used), and of the last leaf only the tail pages still needed;
  a parent whose last child goes becomes a leaf in turn.
  Locked nodes and the root are never evicted. `evict` returns the slot ids; the caller gives
  them back to the allocator.
- Ownership of slots: after `insert(key, slots)` the tree owns the slots past the returned
  count; the first `count` slots given are duplicates of what the tree holds, which the
  caller frees (unless they are the very slots it matched and locked).

Sliding-window models (`window > 0`, a second pool for the local layers' K/V; see
docs/design.md, "Sliding-window layers"): each token also has a local slot, or 0 where that
slot was freed (a tombstone: the token left every window before the prefix was inserted).
Tombstones come in whole pages. A prefix of length L is usable only where its window is whole:
the local slots of positions [L - window + 1, L) all present (the next token's local layers
read them). `match` returns the longest such page-aligned prefix, never one whose local K/V is
gone; global slots are never tombstoned. Eviction frees a leaf's global and local slots
together (`evict_pages`), a leaf whole (its window is at its end: a head cut from it would
be unusable); `local_size` counts the local slots the tree holds.

`disabled=True` (--disable-radix-cache) keeps the interface and caches nothing: matches are
empty and `insert` reports every token as present, so the caller frees all its slots.
"""

from __future__ import annotations

import heapq
import itertools


class RadixNode:
    __slots__ = (
        "children", "key", "last_access", "local", "lock_ref", "num_local", "parent", "serial",
        "value",
    )  # fmt: skip

    def __init__(
        self,
        key: list[int],
        value: list[int],
        parent: RadixNode | None,
        serial: int,
        local: list[int] | None = None,
    ) -> None:
        self.key = key
        self.value = value  # slot ids, one per token of `key`
        # Local-pool slot ids, one per token (0: freed); empty when the tree has no window.
        self.local = local or []
        self.num_local = sum(1 for x in self.local if x)
        self.parent = parent
        # Children keyed by their first page of token ids.
        self.children: dict[tuple[int, ...], RadixNode] = {}
        self.lock_ref = 0
        self.last_access = 0
        self.serial = serial  # creation order: a deterministic tie-break for eviction


class RadixCache:
    def __init__(self, page_size: int = 1, *, disabled: bool = False, window: int = 0) -> None:
        self.page_size = page_size
        self.disabled = disabled
        self.window = window  # the local layers' sliding window; 0: no local pool
        self._serials = itertools.count()
        self.root = RadixNode([], [], None, next(self._serials))
        self._clock = 0
        self.evictable_size = 0
        self.protected_size = 0
        self.evictable_local = 0  # local slots held by unlocked nodes
        self.protected_local = 0

    @property
    def total_size(self) -> int:
        return self.evictable_size + self.protected_size

    @property
    def local_size(self) -> int:
        return self.evictable_local + self.protected_local

    def match_prefix(self, key: list[int]) -> tuple[list[int], RadixNode]:
        """The slots of the longest usable page-aligned cached prefix of `key`, and the node
        where it ends (the root for no match); see `match`."""
        slots, _, node = self.match(key)
        return slots, node

    def match(self, key: list[int]) -> tuple[list[int], list[int], RadixNode]:
        """The global and local slots of the longest page-aligned cached prefix of `key` whose
        window is whole (any prefix without a window), and the node where it ends. Splits a
        node the match ends inside of, so the returned node covers exactly the prefix."""
        slots, local, node = self._walk(key)
        if self.window:
            usable = self._whole_window_len(local)
            if usable < len(slots):
                slots, local, node = self._walk(key[:usable])
        return slots, local, node

    def _walk(self, key: list[int]) -> tuple[list[int], list[int], RadixNode]:
        node = self.root
        slots: list[int] = []
        local: list[int] = []
        if self.disabled:
            return slots, local, node
        key = key[: len(key) - len(key) % self.page_size]
        tick = self._tick()
        while key:
            child = node.children.get(self._child_key(key))
            if child is None:
                break
            child.last_access = tick
            n = self._match_len(child.key, key)
            if n < len(child.key):
                child = self._split(child, n)
            slots.extend(child.value)
            local.extend(child.local)
            node = child
            key = key[n:]
        return slots, local, node

    def _whole_window_len(self, local: list[int]) -> int:
        """The largest page-aligned L <= len(local) whose local slots [L - window + 1, L) are
        all present (0 always qualifies)."""
        last_freed = -1  # after the loop over [0, L): the last position < L whose slot is 0
        best = 0
        for i, slot in enumerate(local):
            if not slot:
                last_freed = i
            length = i + 1
            if length % self.page_size == 0 and last_freed < max(0, length - self.window + 1):
                best = length
        return best

    def insert(self, key: list[int], slots: list[int], local: list[int] | None = None) -> int:
        """Cache `slots` (and, with a window, the `local` slots, 0 where freed) for `key`
        (page-aligned length). Returns how many leading tokens were already cached: the
        caller's slots for those, global and local, are duplicates (see the contract)."""
        if len(key) != len(slots):
            raise ValueError(f"insert: {len(key)} tokens but {len(slots)} slots")
        local = local or []
        if self.window and len(local) != len(key):
            raise ValueError(f"insert: {len(key)} tokens but {len(local)} local slots")
        if len(key) % self.page_size:
            raise ValueError(f"insert: {len(key)} tokens is not a multiple of the page size")
        if self.disabled:
            return len(key)
        node = self.root
        tick = self._tick()
        i = 0
        while i < len(key):
            child = node.children.get(self._child_key(key[i:]))
            if child is None:
                leaf = RadixNode(key[i:], slots[i:], node, next(self._serials), local[i:])
                leaf.last_access = tick
                node.children[self._child_key(leaf.key)] = leaf
                self.evictable_size += len(leaf.key)
                self.evictable_local += leaf.num_local
                return i
            child.last_access = tick
            n = self._match_len(child.key, key[i:])
            if n < len(child.key):
                child = self._split(child, n)
            node = child
            i += n
        return i

    def inc_lock(self, node: RadixNode) -> None:
        while node is not self.root:
            if node.lock_ref == 0:
                self.evictable_size -= len(node.key)
                self.protected_size += len(node.key)
                self.evictable_local -= node.num_local
                self.protected_local += node.num_local
            node.lock_ref += 1
            assert node.parent is not None
            node = node.parent

    def dec_lock(self, node: RadixNode) -> None:
        while node is not self.root:
            if node.lock_ref <= 0:
                raise RuntimeError("dec_lock on an unlocked node")
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self.evictable_size += len(node.key)
                self.protected_size -= len(node.key)
                self.evictable_local += node.num_local
                self.protected_local -= node.num_local
            assert node.parent is not None
            node = node.parent

    def evict(self, num_tokens: int) -> list[int]:
        """Remove unlocked leaves (or their tails), least recently used first, until at least
        `num_tokens` slots (rounded up to pages) are freed or nothing evictable is left.
        Returns the freed slot ids. A tree with a window uses `evict_pages`."""
        if self.window:
            raise RuntimeError("evict: this tree holds local slots too; use evict_pages")
        return self.evict_pages(num_tokens)[0]

    def evict_pages(self, num_tokens: int, num_local: int = 0) -> tuple[list[int], list[int]]:
        """Remove unlocked leaves (or their tails), least recently used first, until at least
        `num_tokens` global slots and `num_local` local slots (each rounded up to pages) are
        freed, or nothing evictable is left. Returns the freed (global, local) slot ids."""
        heap = [(n.last_access, n.serial, n) for n in self._nodes() if self._evictable_leaf(n)]
        heapq.heapify(heap)
        freed: list[int] = []
        freed_local: list[int] = []
        while heap and (len(freed) < num_tokens or len(freed_local) < num_local):
            _, _, leaf = heapq.heappop(heap)
            # Take only the tail pages still needed; the head stays cached.
            tail = self._tail_needed(leaf, num_tokens - len(freed), num_local - len(freed_local))
            if tail < len(leaf.key):
                self._split(leaf, len(leaf.key) - tail)
            parent = leaf.parent
            assert parent is not None
            del parent.children[self._child_key(leaf.key)]
            freed.extend(leaf.value)
            freed_local.extend(x for x in leaf.local if x)
            self.evictable_size -= len(leaf.key)
            self.evictable_local -= leaf.num_local
            if self._evictable_leaf(parent):
                heapq.heappush(heap, (parent.last_access, parent.serial, parent))
        return freed, freed_local

    def _tail_needed(self, leaf: RadixNode, num_tokens: int, num_local: int) -> int:
        """Tokens (whole pages) at the end of `leaf` that free `num_tokens` global and
        `num_local` local slots, or all of it. With a window, all of it: a leaf's window is
        at its end, and a head cut from it would hold slots no hit can use."""
        if self.window:
            return len(leaf.key)
        ps = self.page_size
        tail = -(-max(0, num_tokens) // ps) * ps
        if num_local > 0:
            have = 0
            for i in range(len(leaf.local) - 1, -1, -1):
                have += leaf.local[i] != 0
                if have >= num_local:
                    tail = max(tail, len(leaf.local) - i + (-(len(leaf.local) - i) % ps))
                    break
            else:
                tail = len(leaf.key)
        return min(tail, len(leaf.key))

    # ------------------------------------------------------------------ internals

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _child_key(self, key: list[int]) -> tuple[int, ...]:
        return tuple(key[: self.page_size])

    def _match_len(self, a: list[int], b: list[int]) -> int:
        """Length of the common prefix of a and b, rounded down to whole pages."""
        n = 0
        for x, y in zip(a, b, strict=False):
            if x != y:
                break
            n += 1
        return n - n % self.page_size

    def _split(self, child: RadixNode, n: int) -> RadixNode:
        """Cut `child` after its first n tokens; returns the new upper node. The upper node
        inherits the lock count: every lock through `child` also passed through it."""
        parent = child.parent
        assert parent is not None and 0 < n < len(child.key)
        upper = RadixNode(
            child.key[:n], child.value[:n], parent, next(self._serials), child.local[:n]
        )
        child.num_local -= upper.num_local
        upper.lock_ref = child.lock_ref
        upper.last_access = child.last_access
        parent.children[self._child_key(upper.key)] = upper
        child.key = child.key[n:]
        child.value = child.value[n:]
        child.local = child.local[n:]
        child.parent = upper
        upper.children[self._child_key(child.key)] = child
        return upper

    def _evictable_leaf(self, node: RadixNode) -> bool:
        return node is not self.root and not node.children and node.lock_ref == 0

    def _nodes(self) -> list[RadixNode]:
        out: list[RadixNode] = []
        stack = [self.root]
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out
