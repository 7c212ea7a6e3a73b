"""Scheduler core under memory pressure: retraction, aborts, rejection, pages of 4."""

from __future__ import annotations

import random

from fake_worker import FakeWorker, assert_idle_invariant, make, req, run_to_idle, tokens_of

from fovea.common.messages import AbortRequest, RequestError, ScheduledChunk, SeqOutput
from fovea.scheduler.policy import SchedulerConfig
from fovea.scheduler.scheduler import ABORT_MEMORY_S, Scheduler


def test_retraction_under_a_tiny_pool_completes_every_request() -> None:
    sched, worker = make(num_slots=12)
    for rid, base in (("a", 10), ("b", 20), ("c", 30)):
        sched.handle(req(rid, [base, base + 1, base + 2], max_new=6))
    run_to_idle(sched, worker)
    for rid, base in (("a", 10), ("b", 20), ("c", 30)):
        assert tokens_of(sched, rid) == list(range(base + 3, base + 9))
        final = [o for o in sched.outputs if o.rid == rid][-1]
        assert (final.finish_reason, final.completion_tokens, final.prompt_tokens) == (
            "length",
            6,
            3,
        )
    # All three fit at first (9 slots + a 1-slot reserve each); two decodes later the pool
    # is full and c, the newest, gives way.
    assert [[n.key for n in p.new] for p in worker.plans[:3]] == [["a#0", "b#0", "c#0"], [], []]
    assert worker.plans[2].dropped == ["c#0"]
    assert [c.key for c in worker.plans[2].chunks] == ["a#0", "b#0"]
    # a, the oldest, never stops; b gives way once, c twice (its partial re-admission runs
    # short again). A retraction caches the computed tokens, so re-admissions hit them.
    assert sched.num_retractions == 3
    readmits = [
        (n.key, n.input_ids, n.num_prompt_tokens, n.prefix_slots)
        for p in worker.plans[1:]
        for n in p.new
    ]
    assert readmits == [
        ("b#0", [20, 21, 22, 23, 24, 25, 26], 3, [4, 5, 6, 11]),
        ("c#0", [30, 31, 32, 33, 34], 3, []),
        ("c#0", [30, 31, 32, 33, 34], 3, [2, 3, 10, 12]),
    ]
    # Prompt length and cached_tokens stay those of the first admission.
    assert {(o.prompt_tokens, o.cached_tokens) for o in sched.outputs} == {(3, 0)}
    assert_idle_invariant(sched)


def test_oversized_request_is_rejected_and_one_that_exactly_fits_runs() -> None:
    sched, worker = make(num_slots=16)
    sched.handle(req("big", list(range(10)), max_new=7))
    assert sched.to_server == [
        RequestError(
            rid="big",
            message="request big needs 17 KV slots (10 prompt + 7 max new tokens) but the "
            "cache holds only 16; lower max_tokens or shorten the prompt",
            status=400,
        )
    ]
    assert not sched.has_work
    sched.handle(req("fits", [3] * 10, max_new=6))
    sched.handle(req("other", [9] * 8, max_new=6))
    run_to_idle(sched, worker)
    assert tokens_of(sched, "fits") == [4, 5, 6, 7, 8, 9]
    assert tokens_of(sched, "other") == [10, 11, 12, 13, 14, 15]
    assert_idle_invariant(sched)


def test_abort_waiting_running_and_with_stop_reason() -> None:
    sched, worker = make(max_running_requests=1)
    sched.handle(req("a", [5, 6, 7], max_new=5))
    sched.handle(req("b", [8, 9], max_new=5))
    sched.handle(req("c", [1, 1], max_new=5))
    sched.process_result(worker.step(sched.schedule()))  # type: ignore[arg-type]
    assert sched.allocator.available == 61
    sched.handle(AbortRequest("b", None, "client"))  # waiting: holds no slots
    assert sched.outputs[-1] == SeqOutput("b", 0, [], None, "abort", None, 2, 0, 0)
    assert (sched.allocator.available, [s.key for s in sched.waiting]) == (61, ["c#0"])
    sched.handle(AbortRequest("a", 0, "client"))  # running: its 3 computed tokens go to the tree
    assert sched.outputs[-1] == SeqOutput("a", 0, [], None, "abort", None, 3, 0, 1)
    assert (sched.allocator.available, sched.cache.total_size) == (61, 3)
    plan = sched.schedule()
    assert plan is not None
    assert (plan.dropped, [n.key for n in plan.new]) == (["a#0"], ["c#0"])
    sched.process_result(worker.step(plan))
    n_out = len(sched.outputs)
    sched.handle(AbortRequest("c", 0, "stop"))  # the detokenizer matched a stop string
    assert len(sched.outputs) == n_out  # no abort output for "stop"
    assert sched.schedule() is None
    assert sched.plans.pending_drops == ["c#0"]
    assert_idle_invariant(sched)


def test_abort_for_unknown_rid_drops_the_request_until_expiry() -> None:
    now = [100.0]
    sched = Scheduler(SchedulerConfig(context_length=64), 64, clock=lambda: now[0])
    sched.handle(AbortRequest("x", None, "client"))
    assert sched.outputs == []
    sched.handle(req("x", [1, 2, 3], index=0))
    sched.handle(req("x", [1, 2, 3], index=1))
    assert sched.outputs == [
        SeqOutput("x", 0, [], None, "abort", None, 3, 0, 0),
        SeqOutput("x", 1, [], None, "abort", None, 3, 0, 0),
    ]
    assert not sched.has_work
    now[0] += ABORT_MEMORY_S + 1
    sched.handle(req("x", [1, 2, 3]))
    assert [s.key for s in sched.waiting] == ["x#0"]


def test_abort_all_sequences_of_an_n2_request() -> None:
    sched, worker = make()
    sched.handle(req("r", [4, 5], max_new=4, index=0))
    sched.handle(req("r", [4, 5], max_new=4, index=1))
    sched.process_result(worker.step(sched.schedule()))  # type: ignore[arg-type]
    assert sched.allocator.available == 60
    sched.handle(AbortRequest("r"))
    assert [(o.index, o.finish_reason) for o in sched.outputs[-2:]] == [(0, "abort"), (1, "abort")]
    # Both computed [4, 5]: one copy is kept in the tree, the duplicate freed.
    assert (sched.allocator.available, sched.cache.total_size) == (62, 2)
    assert_idle_invariant(sched)


def test_page_size_4_slots_pages_and_prefix_hit() -> None:
    sched, worker = make(num_slots=32, page_size=4)
    prompt = [50, 51, 52, 53, 54, 55]
    sched.handle(req("a", prompt, max_new=4))
    run_to_idle(sched, worker)
    assert [p.chunks[0].new_slots for p in worker.plans] == [[4, 5, 6, 7, 8, 9], [10], [11], [12]]
    # 9 computed tokens: 2 whole pages cached, the partial third page freed.
    assert (sched.cache.total_size, sched.allocator.available) == (8, 24)
    sched.handle(req("b", [*prompt, 56, 57, 70], max_new=1))
    run_to_idle(sched, worker)
    assert worker.plans[-1].new[0].prefix_slots == [4, 5, 6, 7, 8, 9, 10, 11]
    assert worker.plans[-1].chunks == [ScheduledChunk("b#0", [12], True)]
    assert [o.cached_tokens for o in sched.outputs if o.rid == "b"] == [8]
    assert_idle_invariant(sched)


def stress(page_size: int, seed: int) -> None:
    """Many requests sharing prefixes through a pool far too small for all of them."""
    rng = random.Random(seed)
    sched, worker = make(
        num_slots=48, page_size=page_size, chunked_prefill_size=8, max_prefill_tokens=16
    )
    expected: dict[str, list[int]] = {}
    stems = [[rng.randrange(100, 400) for _ in range(12)] for _ in range(3)]
    for i in range(24):
        prompt = [*rng.choice(stems)[: rng.randrange(2, 13)], rng.randrange(100, 400)]
        max_new = rng.randrange(1, 48 - len(prompt))
        expected[f"r{i}"] = [(prompt[-1] + k) % 512 for k in range(1, max_new + 1)]
        sched.handle(req(f"r{i}", prompt, max_new=max_new, ignore_eos=True))
        if i % 4 == 3:
            for _ in range(3):
                plan = sched.schedule()
                if plan is not None:
                    sched.process_result(worker.step(plan))
    run_to_idle(sched, worker, max_steps=3000)
    for rid, toks in expected.items():
        assert tokens_of(sched, rid) == toks, rid
    assert sched.num_retractions > 0
    assert sched.cache_hit_tokens > 0
    assert_idle_invariant(sched)


def test_stress_page_size_1() -> None:
    for seed in range(3):
        stress(1, seed)


def test_stress_page_size_4() -> None:
    for seed in range(3):
        stress(4, seed)


def test_worker_sees_consistent_state_after_retraction_of_a_chunked_prefill() -> None:
    # Two long prompts prefilled in chunks compete for 24 slots; the newer is retracted
    # mid-prefill, and both still finish with the right tokens.
    sched, worker = make(num_slots=24, chunked_prefill_size=4)
    sched.handle(req("a", [60] * 12, max_new=10))
    sched.handle(req("b", [70] * 12, max_new=10))
    run_to_idle(sched, worker)
    assert tokens_of(sched, "a") == list(range(61, 71))
    assert tokens_of(sched, "b") == list(range(71, 81))
    assert sched.num_retractions >= 1
    assert isinstance(worker, FakeWorker)
    assert_idle_invariant(sched)
