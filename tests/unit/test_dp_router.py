"""Data-parallel routing (tokenizer_service/router.py): the policy's exact decisions, and the
router's copy of each replica's tree against the scheduler's own after inserts, splits,
evictions and a flush."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from fake_worker import assert_idle_invariant, make, req, run_to_idle

from fovea.common.messages import (
    AbortRequest,
    ImageInput,
    ReplicaState,
    TokenizedRequest,
    TreeEvent,
)
from fovea.common.sampling import SamplingParams
from fovea.scheduler.radix_cache import RadixCache, RadixNode
from fovea.scheduler.request import Sequence
from fovea.scheduler.scheduler import Scheduler
from fovea.scheduler.stats import ReplicaPublisher, flush_cache
from fovea.tokenizer_service.router import Decision, Router, RoutingPolicy

POLICY = RoutingPolicy(cache_threshold=0.3, balance_abs_threshold=64, balance_rel_threshold=1.5)


def paths(cache: RadixCache) -> list[list[int]]:
    """Every cached key that no other cached key extends (the tree's leaves, as full keys)."""
    out: list[list[int]] = []

    def walk(node: RadixNode, prefix: list[int]) -> None:
        key = prefix + node.key
        if not node.children and node is not cache.root:
            out.append(key)
        for child in node.children.values():
            walk(child, key)

    walk(cache.root, [])
    return sorted(out)


def image(name: str, offset: int, n: int) -> ImageInput:
    digest = hashlib.blake2b(name.encode(), digest_size=32).digest()
    return ImageInput(digest, offset, n, np.zeros((n, 4), np.float32), [1, n, 1])


def treq(rid: str, ids: list[int], images: list[ImageInput] | None = None) -> TokenizedRequest:
    sampling = SamplingParams(max_new_tokens=2)
    return TokenizedRequest(rid=rid, index=0, input_ids=ids, sampling=sampling, images=images or [])


def state(dp_rank: int, keys: list[list[int]], seen: int = 0, load: int = 0) -> ReplicaState:
    return ReplicaState(dp_rank, [TreeEvent(k) for k in keys], seen, load)


# ------------------------------------------------------------------ the policy


def test_idle_replicas_take_new_prefixes_in_turn_then_prefixes_stick() -> None:
    router = Router(2, 1, POLICY)
    a, b = list(range(10, 20)), list(range(100, 110))
    # Both idle and empty: rank 0; its tree then holds a, so b goes to the smaller tree.
    assert router.choose(a) == Decision(0, "load", 0)
    router.apply(state(0, [[*a, 7]]))
    assert router.choose(b) == Decision(1, "load", 0)
    router.apply(state(1, [b]))
    # A request sharing a's first 9 tokens: 9 of 12 > 0.3, matched on all but its last token.
    assert router.choose([*a[:9], 1, 2, 3]) == Decision(0, "prefix", 9)
    assert router.choose([*b, 5]) == Decision(1, "prefix", 10)
    # 3 of 10 tokens is not more than 0.3: the least loaded (equal) with the smaller tree.
    assert router.choose(a[:3] + list(range(300, 307))) == Decision(1, "load", 0)


def test_equal_prefixes_go_to_the_less_loaded() -> None:
    router = Router(3, 1, POLICY)
    a = list(range(10, 20))
    for d, load in ((0, 30), (1, 20), (2, 40)):
        router.apply(state(d, [a], load=load))
    assert router.choose([*a, 1]) == Decision(1, "prefix", 10)


def test_imbalance_routes_by_load_whatever_the_cache() -> None:
    router = Router(2, 1, POLICY)
    a = list(range(10, 20))
    router.apply(state(0, [a], load=65))
    # 65 - 0 > 64 and 65 > 1.5 * 0: imbalanced.
    assert router.choose([*a, 1]) == Decision(1, "imbalance", 0)
    router.apply(state(1, [], load=1))
    # 64 is not more than 64: balanced again, the prefix wins.
    assert router.choose([*a, 1]) == Decision(0, "prefix", 10)
    router.apply(state(0, [], load=200))
    router.apply(state(1, [], load=134))
    # 66 > 64 but 200 <= 1.5 * 134 = 201: not imbalanced.
    assert router.choose([*a, 1]) == Decision(0, "prefix", 10)
    router.apply(state(1, [], load=133))
    assert router.choose([*a, 1]) == Decision(1, "imbalance", 0)


def test_requests_in_transit_count_until_the_replica_reports_them() -> None:
    router = Router(2, 1, POLICY)
    first = [treq("a", list(range(10, 110)))]  # 100 tokens
    assert router.route(first) == 0
    assert router.loads() == [100, 0]
    # 100 - 0 > 64 and 100 > 0: the next one goes to replica 1 whatever it is.
    assert router.route([treq("b", list(range(10, 110)))]) == 1
    # A request with n=2 sequences: both go to one replica.
    assert router.route([treq("c", [1, 2, 3]), treq("c", [1, 2, 3])]) == 0
    assert router.loads() == [106, 100]
    # Replica 0 took in its first request (and still runs it: 102 tokens), not yet the others.
    router.apply(state(0, [], seen=1, load=102))
    assert router.loads() == [108, 100]
    router.apply(state(0, [], seen=3, load=0))
    assert router.loads() == [0, 100]
    assert router.route([treq("d", [1])], pinned=1) == 1
    assert router.loads() == [0, 101]


def test_images_are_part_of_the_routing_key() -> None:
    router = Router(2, 1, POLICY)
    ids = [1, 2, 9, 9, 9, 9, 3, 4]
    cat = treq("a", ids, [image("cat", 2, 4)])
    dog = treq("b", ids, [image("dog", 2, 4)])
    key = router.key(cat)
    assert key == Sequence("a", 0, ids, cat.sampling, 0, images=cat.images).prompt_key
    assert key[2:6] != ids[2:6] and router.key(dog)[2:6] != key[2:6]
    router.apply(state(1, [key[:7]]))
    assert router.choose(router.key(cat)) == Decision(1, "prefix", 7)
    # The same text with another image shares only the 2 tokens before it: 2 of 8.
    assert router.choose(router.key(dog)) == Decision(0, "load", 0)


def test_salted_keys_equal_the_cross_attention_schedulers() -> None:
    sched, _ = make(cross_image_slots=4)
    r = treq("a", [1, 2, 9, 9, 3], [image("cat", 2, 2)])
    sched.handle(r)
    assert Router(2, 1, POLICY, salted=True).key(r) == sched.waiting[0].prompt_key
    assert Router(2, 1, POLICY, salted=True).key(treq("b", [1, 2])) == [1, 2]


# ------------------------------------------------------------------ the tree view


def mirror(publisher: ReplicaPublisher, router: Router) -> list[TreeEvent]:
    msg = publisher.take()
    if msg is None:
        return []
    router.apply(msg)
    return msg.events


def assert_same_keys(sched: Scheduler, router: Router) -> None:
    view = router.replicas[0].tree
    assert paths(view) == paths(sched.cache)
    assert view.total_size == sched.cache.total_size


@pytest.mark.parametrize("page_size", [1, 2])
def test_view_equals_the_scheduler_tree_through_inserts_and_evictions(page_size: int) -> None:
    # 24 slots: the later requests evict earlier prefixes (whole leaves and tails of them).
    sched, worker = make(num_slots=24, page_size=page_size)
    publisher = ReplicaPublisher(sched, 0)
    router = Router(1, page_size, POLICY)
    prompts = [
        list(range(10, 18)),
        [*list(range(10, 14)), 40, 41, 42, 43],  # splits the first path after 4 tokens
        [*list(range(10, 18)), 50, 51],  # extends the first path
        [60, 61, 62, 63, 64, 65, 66, 67, 68, 69],  # needs room: evicts
        [70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81],
        [*list(range(10, 14)), 90, 91, 92, 93, 94, 95],
    ]
    removed = 0
    for i, ids in enumerate(prompts):
        sched.handle(req(f"r{i}", ids, max_new=3))
        run_to_idle(sched, worker)
        removed += sum(e.removed for e in mirror(publisher, router))
        assert_same_keys(sched, router)
        assert router.replicas[0].reported_seen == i + 1
        assert router.replicas[0].reported_load == 0
    assert removed > 0  # the 24 slots could not keep every prefix: evictions were replayed
    assert flush_cache(sched)
    mirror(publisher, router)
    assert paths(router.replicas[0].tree) == [] and router.replicas[0].tree.total_size == 0
    assert_idle_invariant(sched)


def test_view_follows_aborts_and_reports_load_while_running() -> None:
    sched, worker = make(num_slots=64)
    publisher = ReplicaPublisher(sched, 0)
    router = Router(1, 1, POLICY)
    sched.handle(req("a", [5, 6, 7, 8], max_new=10))
    sched.handle(req("b", [5, 6, 9], max_new=10))
    sched.process_result(worker.step(sched.schedule()))  # type: ignore[arg-type]
    mirror(publisher, router)
    # Both prefilled and sampled one token: 4 + 1 and 3 + 1 tokens.
    assert (router.replicas[0].reported_seen, router.replicas[0].reported_load) == (2, 9)
    assert paths(router.replicas[0].tree) == []
    sched.handle(AbortRequest("a"))
    mirror(publisher, router)
    assert paths(router.replicas[0].tree) == paths(sched.cache) == [[5, 6, 7, 8]]
    assert router.replicas[0].reported_load == 4
    assert publisher.take() is None  # nothing changed since


def test_remove_suffix_refuses_what_is_not_a_cached_leaf() -> None:
    cache = RadixCache(1)
    cache.insert([1, 2, 3, 4], [1, 2, 3, 4])
    cache.insert([1, 2, 5], [1, 2, 5])
    with pytest.raises(ValueError, match="not cached"):
        cache.remove_suffix([1, 2, 6], 1)
    with pytest.raises(ValueError, match="continues past"):
        cache.remove_suffix([1, 2], 1)
    with pytest.raises(ValueError, match="cannot remove"):
        cache.remove_suffix([1, 2, 5], 4)
    assert cache.remove_suffix([1, 2, 3, 4], 2) == [3, 4]
    assert paths(cache) == [[1, 2, 5]] and cache.total_size == 3
    assert cache.remove_suffix([1, 2, 5], 3) == [1, 2, 5]
    assert paths(cache) == [] and cache.total_size == 0
