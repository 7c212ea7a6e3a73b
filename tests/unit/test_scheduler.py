"""Scheduler core against a fake worker: plans, diffs, budgets, stops, prefix hits."""

from __future__ import annotations

from fake_worker import assert_idle_invariant, make, outputs_of, req, run_to_idle, tokens_of

from fovea.common.messages import (
    NewSequence,
    ScheduledChunk,
    SchedulerStats,
    SeqOutput,
    StatsRequest,
)


def test_one_request_exact_plans_and_outputs() -> None:
    sched, worker = make()
    r = req("a", [10, 11, 12])
    sched.handle(r)
    assert run_to_idle(sched, worker) == 3
    p0, p1, p2 = worker.plans
    assert p0.new == [NewSequence("a#0", [10, 11, 12], 3, r.sampling, [])]
    assert p0.chunks == [ScheduledChunk("a#0", [1, 2, 3], True)]
    # Later steps are diffs: no NewSequence, one new slot each.
    assert (p1.new, p1.chunks) == ([], [ScheduledChunk("a#0", [4], True)])
    assert (p2.new, p2.chunks) == ([], [ScheduledChunk("a#0", [5], True)])
    assert [p.dropped for p in worker.plans] == [[], [], []]
    assert sched.plans.pending_drops == ["a#0"]
    assert sched.outputs == [
        SeqOutput("a", 0, [13], None, None, None, 3, 0, 1),
        SeqOutput("a", 0, [14], None, None, None, 3, 0, 2),
        SeqOutput("a", 0, [15], None, "length", None, 3, 0, 3),
    ]
    # The 5 computed tokens (the last output has no KV) are cached.
    sched.handle(StatsRequest("q"))
    assert sched.to_server == [
        SchedulerStats(
            query_id="q",
            total_slots=64,
            free_slots=59,
            tree_slots=5,
            evictable_slots=5,
            running=0,
            waiting=0,
            steps=3,
            cache_hit_tokens=0,
            prompt_tokens=3,
            generated_tokens=3,
        )
    ]
    assert_idle_invariant(sched)


def test_chunked_prefill_exact_chunk_sizes() -> None:
    sched, worker = make(chunked_prefill_size=4)
    sched.handle(req("a", list(range(20, 30)), max_new=2))
    run_to_idle(sched, worker)
    assert [p.chunks for p in worker.plans] == [
        [ScheduledChunk("a#0", [1, 2, 3, 4], False)],
        [ScheduledChunk("a#0", [5, 6, 7, 8], False)],
        [ScheduledChunk("a#0", [9, 10], True)],
        [ScheduledChunk("a#0", [11], True)],
    ]
    assert [len(p.new) for p in worker.plans] == [1, 0, 0, 0]
    assert tokens_of(sched, "a") == [30, 31]
    assert_idle_invariant(sched)


def test_by_default_the_oldest_prompt_takes_the_whole_step_budget() -> None:
    # Defaults: chunk cap = step budget = 2,048 tokens. Two 1,500-token prompts arriving
    # together: the first is computed whole in step 0, the second gets the 548 tokens left.
    sched, worker = make(num_slots=4096, context_length=2048)
    sched.handle(req("a", [5] * 1500, max_new=2))
    sched.handle(req("b", [6] * 1500, max_new=2))
    run_to_idle(sched, worker)
    sizes = [[(c.key, len(c.new_slots), c.sample) for c in p.chunks] for p in worker.plans]
    assert sizes[:3] == [
        [("a#0", 1500, True), ("b#0", 548, False)],
        [("a#0", 1, True), ("b#0", 952, True)],
        [("b#0", 1, True)],
    ]
    assert_idle_invariant(sched)


def test_step_budget_counts_decodes_and_splits_chunks() -> None:
    sched, worker = make(chunked_prefill_size=4, max_prefill_tokens=6)
    sched.handle(req("a", [1, 1, 1, 1, 1], max_new=2))
    sched.handle(req("b", [3, 3, 3, 3, 3], max_new=2))
    run_to_idle(sched, worker)
    assert [p.chunks for p in worker.plans[:2]] == [
        # a takes its cap of 4, b the 2 tokens left of the budget.
        [ScheduledChunk("a#0", [1, 2, 3, 4], False), ScheduledChunk("b#0", [5, 6], False)],
        [ScheduledChunk("a#0", [7], True), ScheduledChunk("b#0", [8, 9, 10], True)],
    ]
    assert_idle_invariant(sched)


def test_prefill_batch_target_stops_taking_prompts() -> None:
    sched, worker = make(prefill_batch_tokens=4)
    for rid, tok in (("a", 5), ("b", 6), ("c", 7)):
        sched.handle(req(rid, [tok] * 3, max_new=2))
    run_to_idle(sched, worker)
    assert [p.chunks for p in worker.plans[:2]] == [
        # a's 3 tokens are under the target, so b comes too and crosses it; c waits.
        [ScheduledChunk("a#0", [1, 2, 3], True), ScheduledChunk("b#0", [4, 5, 6], True)],
        [
            ScheduledChunk("a#0", [7], True),
            ScheduledChunk("b#0", [8], True),
            ScheduledChunk("c#0", [9, 10, 11], True),
        ],
    ]
    assert_idle_invariant(sched)


def test_prefill_batch_target_holds_a_later_chunk_back() -> None:
    sched, worker = make(chunked_prefill_size=8, prefill_batch_tokens=4)
    sched.handle(req("a", [5] * 10, max_new=1))
    sched.handle(req("b", [3, 3], max_new=1))
    run_to_idle(sched, worker)
    assert [p.chunks for p in worker.plans[:2]] == [
        # a's first chunk crosses the target alone (it keeps all 8 tokens).
        [ScheduledChunk("a#0", list(range(1, 9)), False)],
        [ScheduledChunk("a#0", [9, 10], True), ScheduledChunk("b#0", [11, 12], True)],
    ]
    assert_idle_invariant(sched)


def test_no_chunking_admits_an_oversized_prompt_alone() -> None:
    sched, worker = make(chunked_prefill_size=-1, max_prefill_tokens=4)
    sched.handle(req("a", list(range(40, 50)), max_new=2))
    sched.handle(req("b", [5, 6], max_new=1))
    run_to_idle(sched, worker)
    assert worker.plans[0].chunks == [ScheduledChunk("a#0", list(range(1, 11)), True)]
    # b fits the budget next to a's decode.
    assert worker.plans[1].chunks == [
        ScheduledChunk("a#0", [11], True),
        ScheduledChunk("b#0", [12, 13], True),
    ]
    assert_idle_invariant(sched)


def test_mixed_prefill_and_decode_in_one_plan() -> None:
    sched, worker = make()
    sched.handle(req("a", [7, 8, 9], max_new=4))
    sched.process_result(worker.step(sched.schedule()))  # type: ignore[arg-type]
    rb = req("b", [40, 41, 42])
    sched.handle(rb)
    plan = sched.schedule()
    assert plan is not None
    assert plan.new == [NewSequence("b#0", [40, 41, 42], 3, rb.sampling, [])]
    assert plan.chunks == [ScheduledChunk("a#0", [4], True), ScheduledChunk("b#0", [5, 6, 7], True)]
    sched.process_result(worker.step(plan))
    run_to_idle(sched, worker)
    assert tokens_of(sched, "a") == [10, 11, 12, 13]
    assert tokens_of(sched, "b") == [43, 44, 45]
    assert_idle_invariant(sched)


def test_stop_conditions() -> None:
    script = {
        "eos#0": [5, 2, 7],
        "ign#0": [2, 2, 2],
        "stopid#0": [5, 7, 9],
        "min#0": [2, 2, 2, 2],
    }
    sched, worker = make(script=script, context_length=7)
    sched.handle(req("eos", [1], max_new=5))
    sched.handle(req("ign", [1], max_new=3, ignore_eos=True))
    sched.handle(req("stopid", [1], max_new=5, stop_token_ids=[7]))
    sched.handle(req("min", [1], max_new=5, min_new_tokens=3))
    sched.handle(req("ctx", [4, 4, 4, 4, 4], max_new=5))  # 7 tokens of context: 2 outputs
    run_to_idle(sched, worker)
    final = {o.rid: o for o in sched.outputs if o.finish_reason is not None}
    assert final["eos"] == SeqOutput("eos", 0, [2], None, "stop", 2, 1, 0, 2)
    assert final["ign"] == SeqOutput("ign", 0, [2], None, "length", None, 1, 0, 3)
    assert final["stopid"] == SeqOutput("stopid", 0, [7], None, "stop", 7, 1, 0, 2)
    assert final["min"] == SeqOutput("min", 0, [2], None, "stop", 2, 1, 0, 3)
    assert final["ctx"] == SeqOutput("ctx", 0, [6], None, "length", None, 5, 0, 2)
    assert tokens_of(sched, "min") == [2, 2, 2]
    assert_idle_invariant(sched)


def test_prefix_cache_hit() -> None:
    sched, worker = make()
    prompt = list(range(100, 109))  # 9 tokens
    sched.handle(req("a", prompt, max_new=2))
    run_to_idle(sched, worker)  # the tree now holds prompt + first output (109): slots 1..10
    sched.handle(req("b", [*prompt, 50, 51], max_new=1))
    run_to_idle(sched, worker)
    plan = worker.plans[-1]
    assert plan.dropped == ["a#0"]
    assert plan.new[0].prefix_slots == list(range(1, 10))
    assert plan.chunks == [ScheduledChunk("b#0", [11, 12], True)]
    assert outputs_of(sched, "b") == [SeqOutput("b", 0, [52], None, "length", None, 11, 9, 1)]
    # The same prompt again: the last prompt token is always computed.
    sched.handle(req("c", prompt, max_new=1))
    run_to_idle(sched, worker)
    plan = worker.plans[-1]
    assert plan.new[0].prefix_slots == list(range(1, 9))
    assert plan.chunks == [ScheduledChunk("c#0", [13], True)]
    assert outputs_of(sched, "c")[0].cached_tokens == 8
    assert sched.cache_hit_tokens == 17
    assert_idle_invariant(sched)


def test_disabled_radix_cache_frees_everything() -> None:
    sched, worker = make(disable_radix_cache=True)
    sched.handle(req("a", [1, 2, 3, 4], max_new=2))
    run_to_idle(sched, worker)
    sched.handle(req("b", [1, 2, 3, 4], max_new=2))
    run_to_idle(sched, worker)
    assert worker.plans[-2].new[0].prefix_slots == []
    assert worker.plans[-2].chunks == [ScheduledChunk("b#0", [1, 2, 3, 4], True)]
    assert (sched.allocator.available, sched.cache.total_size) == (64, 0)
    assert_idle_invariant(sched)


def admission_order_keys(policy: str, num_waiting: int) -> list[str]:
    sched, worker = make(max_running_requests=1, schedule_policy=policy)
    shared = [90, 91, 92, 93, 94, 95]
    sched.handle(req("warm", shared, max_new=1))
    run_to_idle(sched, worker)
    for i in range(num_waiting - 1):
        sched.handle(req(f"r{i}", [200 + i, 1, 1], max_new=1))
    sched.handle(req("hit", [*shared, 7], max_new=1))
    run_to_idle(sched, worker)
    return [n.key for p in worker.plans[1:] for n in p.new]


def test_admission_order_lpm_when_queue_is_long_fcfs_otherwise() -> None:
    assert admission_order_keys("lpm", 8) == ["hit#0"] + [f"r{i}#0" for i in range(7)]
    assert admission_order_keys("fcfs", 8) == [f"r{i}#0" for i in range(7)] + ["hit#0"]
    assert admission_order_keys("lpm", 7) == [f"r{i}#0" for i in range(6)] + ["hit#0"]


def test_max_running_requests_caps_sequences_holding_kv() -> None:
    sched, worker = make(max_running_requests=2)
    for rid in "abc":
        sched.handle(req(rid, [5, 6], max_new=2))
    plan = sched.schedule()
    assert plan is not None
    assert [n.key for n in plan.new] == ["a#0", "b#0"]
    sched.process_result(worker.step(plan))
    run_to_idle(sched, worker)
    assert [n.key for n in worker.plans[2].new] == ["c#0"]
    assert worker.plans[2].dropped == ["a#0", "b#0"]
    assert_idle_invariant(sched)
