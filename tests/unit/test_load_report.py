"""/get_load's entry (server/native_routes.sglang_load) read off a real scheduler core driven
by the fake worker: requests waiting, running and done, each with exact token counts."""

from __future__ import annotations

from fake_worker import make, req, run_to_idle

from fovea.common.messages import SchedulerStats, StatsRequest
from fovea.scheduler.scheduler import Scheduler
from fovea.server.native_routes import sglang_load


def stats(sched: Scheduler) -> SchedulerStats:
    sched.to_server.clear()
    sched.handle(StatsRequest("q"))
    (answer,) = sched.to_server
    assert isinstance(answer, SchedulerStats)
    return answer


def test_load_counts_waiting_prompts_then_held_slots_then_nothing() -> None:
    # One request runs at a time: b and c wait behind a.
    sched, worker = make(max_running_requests=1)
    for rid, ids in (("a", [10, 11, 12]), ("b", [20, 21, 22, 23, 24]), ("c", [30, 31])):
        sched.handle(req(rid, ids, max_new=4))
    s = stats(sched)
    assert (s.waiting, s.waiting_tokens) == (3, 10)
    assert sglang_load(s) == {"dp_rank": 0, "num_reqs": 3, "num_waiting_reqs": 3, "num_tokens": 10}
    # a's prefill step: it holds its 3 prompt slots (its first output gets a slot when it is
    # fed back, next step); b and c wait.
    sched.process_result(worker.step(sched.schedule()))
    s = stats(sched)
    assert (s.running, s.waiting, s.waiting_tokens) == (1, 2, 7)
    assert sglang_load(s, dp_rank=1) == {
        "dp_rank": 1, "num_reqs": 3, "num_waiting_reqs": 2, "num_tokens": 3 + 7,
    }  # fmt: skip
    run_to_idle(sched, worker)
    s = stats(sched)
    assert s.evictable_slots == s.tree_slots > 0  # the cache alone is no load
    assert sglang_load(s) == {"dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0}
