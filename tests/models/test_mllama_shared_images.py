"""Llama 3.2 Vision requests with the same image share its cross-attention image slot, driven
by the real scheduler on a fresh runner per test (so the slot ids and the K/V fills are
exact): two concurrent requests take one slot and the worker computes its K/V once; a request
arriving while the first still prefills, and a prefix hit while another user runs, reference
the same slot with no fill; abort and retraction of one user keep the slot for the other, and
the counts return to the start; every output equals transformers' and the request run alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mllama_helpers import (
    N_NEW,
    SLOTS,
    MllamaReference,
    Part,
    Prompt,
    free_image_slots,
    scheduler,
    serve,
    tokens_of,
)
from worker_driver import make_runner

from fovea.common.messages import AbortRequest, SchedulerStats, StatsRequest, StepPlan
from fovea.scheduler.scheduler import Scheduler
from fovea.worker.model_runner import ModelRunner

SHORT = 8
# The same image A, two questions; and A with B.
TURNS: dict[str, list[tuple[str, list[Part]]]] = {
    "a_describe": [("user", [("image", "A"), "Describe the image."])],
    "a_colour": [("user", [("image", "A"), "What colour is it?"])],
    "a_and_b": [("user", ["Compare", ("image", "A"), "with", ("image", "B"), "please."])],
}


@pytest.fixture(scope="module", autouse=True)
def _threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def ref(tiny_mllama: Path) -> MllamaReference:
    return MllamaReference(tiny_mllama)


@pytest.fixture(scope="module")
def prompts(ref: MllamaReference, tiny_mllama: Path) -> dict[str, Prompt]:
    return {name: Prompt(ref, tiny_mllama, turns) for name, turns in TURNS.items()}


@pytest.fixture(scope="module")
def reference(ref: MllamaReference, prompts: dict[str, Prompt]) -> dict[str, list[int]]:
    return {name: ref.greedy(p.hf_ids, p.hf_kwargs, N_NEW) for name, p in prompts.items()}


@pytest.fixture
def runner(tiny_mllama: Path) -> ModelRunner:
    """A fresh runner: no slot holds any image's K/V yet."""
    return make_runner(tiny_mllama, max_running_requests=SLOTS, max_images_per_request=2)


def image_state(sched: Scheduler) -> tuple[int, int, int, int]:
    """(image_slots, free_image_slots, image_slot_users, shared_image_slots) as
    /get_server_info shows them."""
    sched.stats(StatsRequest("q"))
    s = sched.to_server.pop()
    assert isinstance(s, SchedulerStats)
    return s.image_slots, s.free_image_slots, s.image_slot_users, s.shared_image_slots


def step(runner: ModelRunner, sched: Scheduler) -> StepPlan:
    plan = sched.schedule()
    assert plan is not None
    sched.process_result(runner.step(plan))
    return plan


def test_two_concurrent_requests_with_one_image_take_one_slot(
    runner: ModelRunner, tiny_mllama: Path, prompts: dict[str, Prompt],
    reference: dict[str, list[int]],
) -> None:  # fmt: skip
    """Both admitted in one step, while the image is still to be encoded: one slot (0), one
    vision-encoder run, one K/V fill; both outputs equal transformers' and their own run
    alone (each alone on another fresh runner, its image in slot 0 too)."""
    x, y = prompts["a_describe"], prompts["a_colour"]
    assert x.images[0].hash == y.images[0].hash and x.ids != y.ids
    sched = scheduler(runner)
    sched.handle(x.request("x"))
    sched.handle(y.request("y"))
    plan = sched.schedule()
    assert plan is not None and [n.image_slots for n in plan.new] == [[0], [0]]
    result = runner.step(plan)
    assert (result.images_encoded, result.cross_kv_computed) == (1, 1)
    sched.process_result(result)
    assert image_state(sched) == (SLOTS, SLOTS - 1, 2, 1)
    assert runner.cross is not None and runner.cross.users == [2, 0, 0]
    serve(runner, sched, [])  # to the end; back to all free (serve checks)
    assert (runner.images_encoded, runner.cross.kv_computed, sched.cross_kv_computed) == (1, 1, 1)
    assert image_state(sched) == (SLOTS, SLOTS, 0, 0)
    assert tokens_of(sched, "x") == reference["a_describe"]
    assert tokens_of(sched, "y") == reference["a_colour"]
    for p, name in ((x, "a_describe"), (y, "a_colour")):
        alone = make_runner(tiny_mllama, max_running_requests=SLOTS, max_images_per_request=2)
        solo = scheduler(alone)
        assert serve(alone, solo, [p.request("s")])[0].new[0].image_slots == [0]
        assert tokens_of(solo, "s") == reference[name]


def test_a_later_user_and_a_prefix_hit_reuse_the_running_slot(
    runner: ModelRunner, prompts: dict[str, Prompt], reference: dict[str, list[int]]
) -> None:
    """x prefills in chunks of 4; y, with the same image, arrives after x's first chunk and
    z (x's prompt again) after x finished while y still runs: z hits x's cached prefix. All
    three read slot 0, filled once, at x's first step."""
    x, y = prompts["a_describe"], prompts["a_colour"]
    sched = scheduler(runner, chunked_prefill_size=4)
    assert runner.cross is not None
    sched.handle(x.request("x", SHORT))
    assert step(runner, sched).new[0].image_slots == [0]
    assert runner.cross.kv_computed == 1
    sched.handle(y.request("y", N_NEW))
    assert step(runner, sched).new[0].image_slots == [0]
    while "x#0" in sched.seqs:
        step(runner, sched)
    assert image_state(sched) == (SLOTS, SLOTS - 1, 1, 0)
    sched.handle(x.request("z", SHORT))
    new = step(runner, sched).new[0]
    assert new.image_slots == [0] and len(new.prefix_slots) == len(x.ids) - 1
    assert image_state(sched) == (SLOTS, SLOTS - 1, 2, 1)
    serve(runner, sched, [])
    assert (runner.images_encoded, runner.cross.kv_computed) == (1, 1)
    assert tokens_of(sched, "x") == tokens_of(sched, "z") == reference["a_describe"][:SHORT]
    assert tokens_of(sched, "y") == reference["a_colour"]
    assert image_state(sched) == (SLOTS, SLOTS, 0, 0)


def test_abort_of_one_user_keeps_the_slot_for_the_other(
    runner: ModelRunner, prompts: dict[str, Prompt], reference: dict[str, list[int]]
) -> None:
    """x (A) and w (A, B) share slot 0; aborting x leaves slot 0 to w, which finishes with
    transformers' tokens; then v (A) takes slot 0 back, still holding A's K/V (no fill), and
    its abort frees everything."""
    x, w = prompts["a_describe"], prompts["a_and_b"]
    sched = scheduler(runner)
    assert runner.cross is not None
    sched.handle(x.request("x"))
    sched.handle(w.request("w"))
    plan = step(runner, sched)
    assert [n.image_slots for n in plan.new] == [[0], [0, 1]]
    assert image_state(sched) == (SLOTS, SLOTS - 2, 3, 1)
    sched.handle(AbortRequest("x"))
    assert image_state(sched) == (SLOTS, SLOTS - 2, 2, 0)
    assert sched.plans.pending_drops == ["x#0"]
    step(runner, sched)  # the workers drop x
    assert runner.cross.users == [1, 1, 0]
    serve(runner, sched, [])
    assert tokens_of(sched, "w") == reference["a_and_b"]
    assert image_state(sched) == (SLOTS, SLOTS, 0, 0)
    sched.handle(x.request("v"))
    assert step(runner, sched).new[0].image_slots == [0]
    sched.handle(AbortRequest("v"))
    runner.step(StepPlan(0, [], [], sched.plans.pending_drops))
    assert image_state(sched) == (SLOTS, SLOTS, 0, 0)
    assert runner.cross.users == [0, 0, 0] and runner.seqs == {}
    assert (runner.images_encoded, runner.cross.kv_computed) == (2, 2)


def test_retraction_of_one_user_keeps_the_slot_for_the_other(
    runner: ModelRunner, prompts: dict[str, Prompt], reference: dict[str, list[int]]
) -> None:
    """KV memory for one sequence and a half: w (A, B), the newer, is retracted while x (A)
    runs; slot 0 stays x's, B's slot 1 is free (keeping its K/V); w comes back to slots 0
    and 1 with no fill. Both give transformers' tokens."""
    x, w = prompts["a_describe"], prompts["a_and_b"]
    need = max(len(x.ids), len(w.ids)) + N_NEW
    sched = scheduler(runner, num_slots=need + 12)
    assert runner.cross is not None
    sched.handle(x.request("x"))
    sched.handle(w.request("w"))
    plan = step(runner, sched)
    assert [n.image_slots for n in plan.new] == [[0], [0, 1]]
    while not sched.num_retractions:
        plan = step(runner, sched)
    # The step that retracted w carried its drop; x decoded in it.
    assert [s.key for s in sched.waiting] == ["w#0"] and plan.dropped == ["w#0"]
    assert image_state(sched) == (SLOTS, SLOTS - 1, 1, 0)
    assert runner.cross.users == [1, 0, 0]
    readmitted = []
    while sched.has_work:
        readmitted += [n.image_slots for n in step(runner, sched).new]
    runner.step(StepPlan(0, [], [], sched.plans.pending_drops))
    assert readmitted == [[0, 1]]
    assert (runner.images_encoded, runner.cross.kv_computed) == (2, 2)
    assert tokens_of(sched, "x") == reference["a_describe"]
    assert tokens_of(sched, "w") == reference["a_and_b"]
    assert image_state(sched) == (SLOTS, SLOTS, 0, 0)
    assert runner.cross.users == [0, 0, 0] and free_image_slots(runner) == SLOTS
