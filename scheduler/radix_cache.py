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

Events (data parallelism): with `record_events()`, every change of the set of cached keys is
appended to `events` (TreeEvent: an insert that added tokens, each eviction of a leaf or its
tail), so a router replaying them in order (`remove_suffix` for evictions) holds the same keys.

`disabled=True` (--disable-radix-cache) keeps the interface and caches nothing: matches are
empty and `insert` reports every token as present, so the caller frees all its slots.
"""

from __future__ import annotations

import heapq
import itertools

from fovea.common.messages import TreeEvent


class RadixNode:
    __slots__ = ("children", "key", "last_access", "lock_ref", "parent", "serial", "value")

    def __init__(
        self, key: list[int], value: list[int], parent: RadixNode | None, serial: int
    ) -> None:
        self.key = key
        self.value = value  # slot ids, one per token of `key`
        self.parent = parent
        # Children keyed by their first page of token ids.
        self.children: dict[tuple[int, ...], RadixNode] = {}
        self.lock_ref = 0
        self.last_access = 0
        self.serial = serial  # creation order: a deterministic tie-break for eviction


class RadixCache:
    def __init__(self, page_size: int = 1, *, disabled: bool = False) -> None:
        self.page_size = page_size
        self.disabled = disabled
        self._serials = itertools.count()
        self.root = RadixNode([], [], None, next(self._serials))
        self._clock = 0
        self.evictable_size = 0
        self.protected_size = 0
        self.events: list[TreeEvent] | None = None  # None: not recorded

    def record_events(self) -> None:
        """From now on, append every change of the cached keys to `events`."""
        self.events = []

    @property
    def total_size(self) -> int:
        return self.evictable_size + self.protected_size

    def match_prefix(self, key: list[int]) -> tuple[list[int], RadixNode]:
        """The slots of the longest page-aligned cached prefix of `key`, and the node where it
        ends (the root for no match). Splits a node the match ends inside of, so the returned
        node covers exactly the prefix."""
        node = self.root
        slots: list[int] = []
        if self.disabled:
            return slots, node
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
            node = child
            key = key[n:]
        return slots, node

    def insert(self, key: list[int], slots: list[int]) -> int:
        """Cache `slots` for `key` (page-aligned length). Returns how many leading tokens were
        already cached: the caller's slots for those are duplicates (see the contract)."""
        if len(key) != len(slots):
            raise ValueError(f"insert: {len(key)} tokens but {len(slots)} slots")
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
                leaf = RadixNode(key[i:], slots[i:], node, next(self._serials))
                leaf.last_access = tick
                node.children[self._child_key(leaf.key)] = leaf
                self.evictable_size += len(leaf.key)
                if self.events is not None:
                    self.events.append(TreeEvent(list(key)))
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
            assert node.parent is not None
            node = node.parent

    def evict(self, num_tokens: int) -> list[int]:
        """Remove unlocked leaves (or their tails), least recently used first, until at least
        `num_tokens` slots (rounded up to pages) are freed or nothing evictable is left.
        Returns the freed slot ids."""
        heap = [(n.last_access, n.serial, n) for n in self._nodes() if self._evictable_leaf(n)]
        heapq.heapify(heap)
        freed: list[int] = []
        while heap and len(freed) < num_tokens:
            _, _, leaf = heapq.heappop(heap)
            # Take only the tail pages still needed; the head stays cached.
            still = -(-(num_tokens - len(freed)) // self.page_size) * self.page_size
            if still < len(leaf.key):
                self._split(leaf, len(leaf.key) - still)
            parent = leaf.parent
            assert parent is not None
            if self.events is not None:
                self.events.append(TreeEvent(self._path(leaf), len(leaf.key)))
            del parent.children[self._child_key(leaf.key)]
            freed.extend(leaf.value)
            self.evictable_size -= len(leaf.key)
            if self._evictable_leaf(parent):
                heapq.heappush(heap, (parent.last_access, parent.serial, parent))
        return freed

    def remove_suffix(self, key: list[int], n: int) -> list[int]:
        """Remove the last `n` tokens of the cached path `key` (no cached key may extend past
        it, none of them locked): how a router's copy replays an eviction event. Returns their
        slot ids. ValueError if `key` is not such a path."""
        node, i = self.root, 0
        while i < len(key):
            child = node.children.get(self._child_key(key[i:]))
            if child is None or key[i : i + len(child.key)] != child.key:
                raise ValueError(f"remove_suffix: a path of {len(key)} tokens is not cached")
            node, i = child, i + len(child.key)
        if i != len(key) or n > len(key) or n % self.page_size:
            raise ValueError(f"remove_suffix: cannot remove {n} of {len(key)} tokens")
        freed: list[int] = []
        while n > 0:
            if node.children or node.lock_ref:
                raise ValueError("remove_suffix: the path continues past its end, or is locked")
            if n < len(node.key):
                self._split(node, len(node.key) - n)
            parent = node.parent
            assert parent is not None
            del parent.children[self._child_key(node.key)]
            freed[:0] = node.value
            self.evictable_size -= len(node.key)
            n -= len(node.key)
            node = parent
        return freed

    # ------------------------------------------------------------------ internals

    def _path(self, node: RadixNode) -> list[int]:
        """The key from the root to the end of `node`."""
        parts: list[list[int]] = []
        while node is not self.root:
            parts.append(node.key)
            assert node.parent is not None
            node = node.parent
        return [t for part in reversed(parts) for t in part]

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
        upper = RadixNode(child.key[:n], child.value[:n], parent, next(self._serials))
        upper.lock_ref = child.lock_ref
        upper.last_access = child.last_access
        parent.children[self._child_key(upper.key)] = upper
        child.key = child.key[n:]
        child.value = child.value[n:]
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
