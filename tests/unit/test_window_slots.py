"""The sliding-window layers' pool in the scheduler: local slots freed once they leave every
window (exact slot ids and counts), the tree matching only prefixes whose window is whole,
eviction and /flush_cache freeing both pools, refusal of a request the local pool cannot
hold, and a randomized run under memory pressure checked by the fake worker (no window ever
reads a slot freed and handed out again)."""

from __future__ import annotations

import random

import msgspec
from fake_worker import assert_idle_invariant, make, req, run_to_idle, tokens_of

from fovea.common.messages import RequestError, StatsRequest
from fovea.scheduler.radix_cache import RadixCache
from fovea.server.native_responses import kv_pools

PROMPT = list(range(10, 20))  # 10 tokens


def test_local_slots_leave_with_the_window_and_the_prompt_anchor_stays() -> None:
    """Window 4, pages of 1. After the 10-token prompt (local slots 1..10), positions 0..5 go
    back (6, 7, 8 are the window of the prompt's hit point 9); decode then reuses slot 1."""
    sched, worker = make(num_slots=64, num_local_slots=64, sliding_window=4)
    sched.handle(req("a", PROMPT, max_new=5))
    run_to_idle(sched, worker)
    plans = worker.plans
    assert plans[0].chunks[0].new_local_slots == list(range(1, 11))
    # Positions 10, 11, 12, 13 decode into the lowest free local slots: 1, 2, 3, then 4
    # (position 9's slot 10 went back before position 13, but 4 is lower).
    assert [p.chunks[0].new_local_slots for p in plans[1:]] == [[1], [2], [3], [4]]
    assert [p.chunks[0].new_slots for p in plans[1:]] == [[11], [12], [13], [14]]
    # Freed early: positions 0..5 (6), 9 (1), then 10 at release (1).
    assert sched.local is not None and sched.local.freed_early == 8
    # The tree keeps positions 6, 7, 8 (slots 7, 8, 9) and 11, 12, 13 (slots 2, 3, 4).
    path = sched.cache.match([*PROMPT, 20, 21, 22, 23, 99])[1]
    assert path == [0, 0, 0, 0, 0, 0, 7, 8, 9, 0, 0, 2, 3, 4]
    assert (sched.cache.local_size, sched.local.available) == (6, 58)
    assert (sched.cache.total_size, sched.allocator.available) == (14, 50)
    assert_idle_invariant(sched)


def test_hits_only_where_the_window_is_whole() -> None:
    sched, worker = make(num_slots=64, num_local_slots=64, sliding_window=4)
    sched.handle(req("a", PROMPT, max_new=5))
    run_to_idle(sched, worker)
    out_a = tokens_of(sched, "a")
    assert out_a == [20, 21, 22, 23, 24]
    # The same prompt: a hit of 9 tokens (the anchor's window, positions 6..8, is whole).
    sched.handle(req("b", PROMPT, max_new=2))
    # The conversation continued: a hit of all 14 computed tokens.
    sched.handle(req("c", PROMPT + out_a + [7, 8], max_new=2))
    # A prompt sharing 7 tokens only: its window (positions 4..6) is gone, so no hit.
    sched.handle(req("d", [*PROMPT[:7], 300, 301, 302], max_new=2))
    run_to_idle(sched, worker)
    hits = {o.rid: o.cached_tokens for o in sched.outputs if o.rid in "bcd"}
    assert hits == {"b": 9, "c": 14, "d": 0}
    b_new = next(n for p in worker.plans for n in p.new if n.key == "b#0")
    assert b_new.prefix_local_slots == [0, 0, 0, 0, 0, 0, 7, 8, 9]
    assert_idle_invariant(sched)


def test_pages_of_four_free_whole_pages_only() -> None:
    """Window 6, pages of 4, a 21-token prompt (local slots 4..24, pages 1..6): dead below
    20 - 6 + 1 = 15, so positions [0, 12) go back, three pages; [12, 16) reaches into the
    prompt anchor's window [15, 20) and stays."""
    prompt = list(range(100, 121))
    sched, _ = make(num_slots=64, num_local_slots=64, sliding_window=6, page_size=4)
    sched.handle(req("a", prompt, max_new=2))
    assert sched.schedule() is not None
    seq = sched.running[0]
    assert sched.local is not None and seq.local_slots == list(range(4, 25))
    assert sched.local.trim(seq) == 12
    assert seq.local_slots == [0] * 12 + list(range(16, 25))
    assert sched.local.available == 64 - 24 + 12
    assert sched.local.trim(seq) == 0  # nothing more until the sequence moves on


def test_flush_cache_empties_both_pools() -> None:
    sched, worker = make(
        num_slots=64, num_local_slots=32, sliding_window=4, kv_bytes_per_token=512,
        local_kv_bytes_per_token=1024,
    )  # fmt: skip
    for rid, base in (("a", 10), ("b", 40)):
        sched.handle(req(rid, list(range(base, base + 12)), max_new=4))
    run_to_idle(sched, worker)
    assert sched.cache.local_size > 0
    sched.handle(StatsRequest(query_id="q", flush_cache=True))
    stats = sched.to_server[-1]
    assert not isinstance(stats, RequestError)
    assert (stats.flushed, stats.free_slots, stats.tree_slots) == (True, 64, 0)
    assert (stats.local_slots, stats.local_free_slots, stats.local_tree_slots) == (32, 32, 0)
    assert stats.sliding_window == 4
    pools = kv_pools(msgspec.to_builtins(stats))
    assert pools == {
        "global": {
            "kind": "kv", "bytes_per_token": 512, "total_slots": 64, "free_slots": 64,
            "tree_slots": 0, "used_slots": 0,
        },
        "local": {
            "kind": "kv", "bytes_per_token": 1024, "total_slots": 32, "free_slots": 32,
            "tree_slots": 0, "used_slots": 0,
            "freed_early": sched.local.freed_early if sched.local else -1, "sliding_window": 4,
        },
    }  # fmt: skip
    one, _ = make(num_slots=64)
    one.handle(StatsRequest(query_id="q"))
    assert list(kv_pools(msgspec.to_builtins(one.to_server[-1]))) == ["global"]


def test_a_request_the_local_pool_cannot_hold_is_refused() -> None:
    """Window 4, chunks of 8: one sequence holds at most min(need, 8 + 2 * 4 + 4) = 20
    local slots; a pool of 16 takes a need of 12 but not one of 30."""
    sched, worker = make(num_slots=64, num_local_slots=16, sliding_window=4, chunked_prefill_size=8)
    sched.handle(req("small", list(range(10, 20)), max_new=2))
    sched.handle(req("big", list(range(10, 30)), max_new=10))
    errors = [m for m in sched.to_server if isinstance(m, RequestError)]
    assert [(e.rid, e.status) for e in errors] == [("big", 400)]
    assert "needs 20 slots of the sliding-window layers' pool but it holds only 16" in (
        errors[0].message
    )
    run_to_idle(sched, worker)
    assert tokens_of(sched, "small") == [20, 21]
    assert_idle_invariant(sched)


def test_radix_match_cuts_to_a_whole_window_and_evicts_local_slots() -> None:
    cache = RadixCache(1, window=3)
    key = [1, 2, 3, 4, 5, 6, 7, 8]
    assert cache.insert(key, list(range(11, 19)), [0, 0, 0, 0, 5, 6, 7, 8]) == 0
    assert (cache.total_size, cache.local_size) == (8, 4)
    slots, local, _ = cache.match(key)
    assert (slots, local) == (list(range(11, 19)), [0, 0, 0, 0, 5, 6, 7, 8])
    assert cache.match([*key[:6], 99])[:2] == ([11, 12, 13, 14, 15, 16], [0, 0, 0, 0, 5, 6])
    assert cache.match([*key[:5], 99])[:2] == ([], [])  # needs positions 3, 4: 3 is gone
    # Shorter than the window: every position must be there.
    short = RadixCache(1, window=8)
    short.insert([1, 2, 3], [21, 22, 23], [31, 32, 33])
    assert short.match([1, 2, 3, 4])[:2] == ([21, 22, 23], [31, 32, 33])
    # Eviction for 2 local slots takes the tail pages holding them (positions 6, 7).
    assert cache.evict_pages(0, 2) == ([17, 18], [7, 8])
    assert (cache.total_size, cache.local_size) == (6, 2)
    # The failed match split [1..6] at 5: leaf [6] goes first, then [1..5].
    assert cache.evict_pages(6, 2) == ([16, 11, 12, 13, 14, 15], [6, 5])
    assert (cache.total_size, cache.local_size) == (0, 0)


def test_random_load_under_pressure_reads_no_stale_window() -> None:
    """Shared prefixes, retractions and eviction in both pools; the fake worker checks every
    window read. Ends with exact accounting in both pools."""
    rng = random.Random(7)
    sched, worker = make(
        num_slots=96, num_local_slots=48, sliding_window=6, page_size=2,
        chunked_prefill_size=8, max_prefill_tokens=16, context_length=80,
    )  # fmt: skip
    stems = [list(rng.randrange(3, 500) for _ in range(20)) for _ in range(3)]
    for i in range(24):
        stem = stems[i % 3][: rng.randrange(4, 21)]
        tail = [rng.randrange(3, 500) for _ in range(rng.randrange(1, 10))]
        sched.handle(req(f"r{i}", stem + tail, max_new=rng.randrange(1, 12), ignore_eos=True))
    run_to_idle(sched, worker, max_steps=2000)
    finished = {o.rid for o in sched.outputs if o.finish_reason == "length"}
    assert finished == {f"r{i}" for i in range(24)}
    assert sched.num_retractions > 0 and sched.cache_hit_tokens > 0
    assert sched.local is not None and sched.local.freed_early > 0
    assert_idle_invariant(sched)
