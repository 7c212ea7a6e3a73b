"""Scheduler core planning one step ahead: the next plan is built before the last result is
back (what the scheduler process does in steady decoding)."""

from __future__ import annotations

from fake_worker import assert_idle_invariant, make, req, run_ahead, run_to_idle, tokens_of

from fovea.common.messages import AbortRequest, ScheduledChunk, SeqOutput, StatsRequest
from fovea.scheduler.main import plan_ahead_after


def test_a_length_limit_is_seen_ahead_so_no_step_is_wasted() -> None:
    sched, worker = make()
    sched.handle(req("a", [10, 11, 12], max_new=3))
    assert run_ahead(sched, worker) == 3
    assert [p.chunks for p in worker.plans] == [
        [ScheduledChunk("a#0", [1, 2, 3], True)],
        [ScheduledChunk("a#0", [4], True)],
        [ScheduledChunk("a#0", [5], True)],
    ]
    assert tokens_of(sched, "a") == [13, 14, 15]
    assert sched.outputs[-1].finish_reason == "length"
    assert (sched.cache.total_size, sched.allocator.available) == (5, 59)
    assert_idle_invariant(sched)


def test_eos_ahead_computes_one_token_in_vain_and_caches_the_eos_kv() -> None:
    sched, worker = make(script={"a#0": [13, 2]})
    sched.handle(req("a", [10, 11, 12], max_new=5))
    # The third plan goes out before the second's result (EOS) is back: its token is dropped.
    assert run_ahead(sched, worker) == 3
    assert worker.plans[2].chunks == [ScheduledChunk("a#0", [5], True)]
    assert sched.outputs == [
        SeqOutput("a", 0, [13], None, None, None, 3, 0, 1),
        SeqOutput("a", 0, [2], None, "stop", 2, 3, 0, 2),
    ]
    sched.handle(StatsRequest("q"))
    assert sched.to_server[-1].generated_tokens == 2  # type: ignore[union-attr]
    # The step in vain computed the EOS token's KV: all 5 tokens are cached, and a prompt
    # that continues them hits every one (the fake worker checks the slots' contents).
    assert (sched.cache.total_size, sched.allocator.available) == (5, 59)
    sched.handle(req("b", [10, 11, 12, 13, 2, 7], max_new=1))
    run_to_idle(sched, worker)
    assert worker.plans[-1].new[0].prefix_slots == [1, 2, 3, 4, 5]
    assert worker.plans[-1].dropped == ["a#0"]
    assert tokens_of(sched, "b") == [8]
    assert_idle_invariant(sched)


def test_abort_with_two_plans_in_flight_caches_only_known_tokens() -> None:
    sched, worker = make()
    sched.handle(req("a", [5, 6, 7], max_new=10))
    p0, p1 = sched.schedule(), None
    assert p0 is not None
    r0 = worker.step(p0)
    p1 = sched.schedule()
    assert p1 is not None and p1.chunks == [ScheduledChunk("a#0", [4], True)]
    r1 = worker.step(p1)
    # Slot 4 is written by the plan in flight for a token the scheduler has not seen yet:
    # only the 3 known tokens go into the tree, slot 4 is freed.
    sched.handle(AbortRequest("a", None, "client"))
    assert (sched.cache.total_size, sched.allocator.available) == (3, 61)
    sched.process_result(r0)
    sched.process_result(r1)
    assert sched.outputs == [SeqOutput("a", 0, [], None, "abort", None, 3, 0, 0)]
    assert sched.schedule() is None
    assert_idle_invariant(sched)


def test_a_retracted_sequence_never_takes_a_token_of_its_earlier_admission() -> None:
    # Two sequences outgrow 10 slots; b, the newest, is retracted while its token is in
    # flight, and that token's result must not be appended after its re-admission.
    sched, worker = make(num_slots=10)
    sched.handle(req("a", [10, 11, 12], max_new=5))
    sched.handle(req("b", [20, 21], max_new=5))
    run_ahead(sched, worker)
    assert sched.num_retractions >= 1
    assert tokens_of(sched, "a") == [13, 14, 15, 16, 17]
    assert tokens_of(sched, "b") == [22, 23, 24, 25, 26]
    assert_idle_invariant(sched)


def test_the_process_plans_ahead_only_in_steady_decoding() -> None:
    sched, worker = make()
    sched.handle(req("a", [10, 11, 12], max_new=8))
    prefill = sched.schedule()
    assert prefill is not None and not plan_ahead_after(prefill, sched)
    sched.process_result(worker.step(prefill))
    decode = sched.schedule()
    assert decode is not None and plan_ahead_after(decode, sched)
    sched.handle(req("b", [20, 21], max_new=2))  # waiting: the next plan waits for the result
    assert not plan_ahead_after(decode, sched)
