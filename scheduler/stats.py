"""The scheduler's state as the server sees it (/get_server_info), and /flush_cache; as the
router sees it (--dp-size > 1): ReplicaState, its tree's changes and its load."""

from __future__ import annotations

import logging
from typing import Protocol

from fovea.common.messages import ReplicaState, SchedulerStats
from fovea.scheduler.batch import PlanBuilder
from fovea.scheduler.cross_images import CrossImageSlots
from fovea.scheduler.kv_allocator import KVAllocator
from fovea.scheduler.policy import SchedulerConfig
from fovea.scheduler.radix_cache import RadixCache
from fovea.scheduler.request import Sequence
from fovea.scheduler.window_slots import WindowSlots

log = logging.getLogger("fovea.scheduler")


class Core(Protocol):
    """What these functions read of the Scheduler (scheduler/scheduler.py), which imports them."""

    config: SchedulerConfig
    running: list[Sequence]
    waiting: list[Sequence]
    allocator: KVAllocator
    local: WindowSlots | None
    cache: RadixCache
    plans: PlanBuilder
    cross_images: CrossImageSlots | None
    cache_hit_tokens: int
    prompt_tokens: int
    generated_tokens: int
    images_encoded: int
    image_cache_bytes: int
    cross_kv_computed: int
    num_retractions: int
    requests_seen: int

    @property
    def total_slots(self) -> int: ...


def flush_cache(core: Core) -> bool:
    """Empty the prefix cache, only when nothing runs or waits (SGLang's rule): then no
    sequence holds a lock in the tree and every cached slot is evictable. True if emptied."""
    if core.running or core.waiting:
        return False
    freed, freed_local = core.cache.evict_pages(
        core.cache.evictable_size, core.cache.evictable_local
    )
    core.allocator.free(freed)
    if core.local is not None:
        core.local.free(freed_local)
    log.info("flush_cache: prefix cache emptied (%d slots free)", core.allocator.available)
    return core.cache.total_size == 0


def snapshot(core: Core, query_id: str, flushed: bool = False, dp_rank: int = 0) -> SchedulerStats:
    images = core.cross_images
    local = core.local
    return SchedulerStats(
        query_id=query_id,
        dp_rank=dp_rank,
        flushed=flushed,
        total_slots=core.total_slots,
        free_slots=core.allocator.available,
        tree_slots=core.cache.total_size,
        evictable_slots=core.cache.evictable_size,
        running=len(core.running),
        waiting=len(core.waiting),
        waiting_tokens=sum(len(seq.prompt_ids) + len(seq.output_ids) for seq in core.waiting),
        steps=core.plans.step,
        cache_hit_tokens=core.cache_hit_tokens,
        prompt_tokens=core.prompt_tokens,
        generated_tokens=core.generated_tokens,
        images_encoded=core.images_encoded,
        image_cache_bytes=core.image_cache_bytes,
        retractions=core.num_retractions,
        image_slots=images.capacity if images else 0,
        free_image_slots=images.free if images else 0,
        image_slot_users=images.users if images else 0,
        shared_image_slots=images.shared if images else 0,
        cross_kv_computed=core.cross_kv_computed,
        kv_kind=core.config.kv_kind,
        kv_bytes_per_token=core.config.kv_bytes_per_token,
        local_kv_bytes_per_token=core.config.local_kv_bytes_per_token,
        local_slots=local.total_slots if local else 0,
        local_free_slots=local.available if local else 0,
        local_tree_slots=core.cache.local_size,
        local_freed_early=local.freed_early if local else 0,
        sliding_window=local.window if local else 0,
    )


def load_tokens(core: Core) -> int:
    """The replica's load as the router weighs it: tokens of its waiting and running
    sequences (prompt and output so far)."""
    return sum(s.num_tokens for s in core.waiting) + sum(s.num_tokens for s in core.running)


class ReplicaPublisher:
    """Builds the ReplicaState messages of one replica: each carries the tree events recorded
    since the previous one; none is built while nothing changed."""

    def __init__(self, core: Core, dp_rank: int) -> None:
        self.core, self.dp_rank = core, dp_rank
        core.cache.record_events()
        self.last = (0, 0)  # (seen, load) of the last message

    def take(self) -> ReplicaState | None:
        core = self.core
        events = core.cache.events or []
        now = (core.requests_seen, load_tokens(core))
        if not events and now == self.last:
            return None
        core.cache.events = []
        self.last = now
        return ReplicaState(self.dp_rank, events, *now)
