"""The scheduler's state as the server sees it (/get_server_info), and /flush_cache."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from fovea.common.messages import SchedulerStats

if TYPE_CHECKING:
    from fovea.scheduler.scheduler import Scheduler

log = logging.getLogger("fovea.scheduler")


def flush_cache(core: Scheduler) -> bool:
    """Empty the prefix cache, only when nothing runs or waits (SGLang's rule): then no
    sequence holds a lock in the tree and every cached slot is evictable. True if emptied."""
    if core.running or core.waiting:
        return False
    core.allocator.free(core.cache.evict(core.cache.evictable_size))
    log.info("flush_cache: prefix cache emptied (%d slots free)", core.allocator.available)
    return core.cache.total_size == 0


def snapshot(core: Scheduler, query_id: str, flushed: bool = False) -> SchedulerStats:
    images = core.cross_images
    return SchedulerStats(
        query_id=query_id,
        flushed=flushed,
        total_slots=core.total_slots,
        free_slots=core.allocator.available,
        tree_slots=core.cache.total_size,
        evictable_slots=core.cache.evictable_size,
        running=len(core.running),
        waiting=len(core.waiting),
        steps=core.plans.step,
        cache_hit_tokens=core.cache_hit_tokens,
        prompt_tokens=core.prompt_tokens,
        generated_tokens=core.generated_tokens,
        images_encoded=core.images_encoded,
        retractions=core.num_retractions,
        image_slots=images.capacity if images else 0,
        free_image_slots=images.free if images else 0,
    )
