"""Images encoded ahead of their prompts' prefill (scheduler/encode_ahead.py): a prompt with
images waits, without holding other prompts or running decodes, until the workers report its
images ready; each image is sent to encode once. Exact plans against the fake worker, which
fails a prefill whose images it has not finished encoding."""

from __future__ import annotations

from fake_worker import (
    assert_idle_invariant,
    image,
    image_req,
    make,
    req,
    run_to_idle,
    tokens_of,
)

from fovea.common.messages import AbortRequest, StepPlan
from fovea.scheduler.encode_ahead import MAX_IN_FLIGHT

PAD = 9


# 3 text tokens, image "cat" at [3, 7), 2 text, image "dog" at [9, 15), 2 text: 17 tokens.
IDS = [5, 6, 7, *[PAD] * 4, 8, 9, *[PAD] * 6, 10, 11]
CAT, DOG = image("cat", 3, 4), image("dog", 9, 6)


def chunk_keys(plans: list[StepPlan]) -> list[list[str]]:
    return [[c.key for c in p.chunks] for p in plans]


def encoded(plans: list[StepPlan]) -> list[list[bytes]]:
    return [[img.hash for img in p.encode] for p in plans]


def test_text_prompt_goes_first_while_images_encode_exact_plans() -> None:
    sched, worker = make(encode_steps=3)
    sched.handle(image_req("a", IDS, [CAT, DOG]))
    sched.handle(req("b", [20, 21, 22], max_new=4))
    run_to_idle(sched, worker)
    # Step 0 sends both images and prefills b; a waits through steps 1-2 while b decodes;
    # the images are ready after step 2, so a is admitted (whole prompt) in step 3.
    assert encoded(worker.plans) == [[CAT.hash, DOG.hash], [], [], [], []]
    assert chunk_keys(worker.plans) == [["b#0"], ["b#0"], ["b#0"], ["b#0", "a#0"], ["a#0"]]
    assert [[n.key for n in p.new] for p in worker.plans] == [["b#0"], [], [], ["a#0"], []]
    assert [len(c.new_slots) for c in worker.plans[3].chunks] == [1, 17]
    assert tokens_of(sched, "a") == [12, 13]
    assert tokens_of(sched, "b") == [23, 24, 25, 26]
    assert_idle_invariant(sched)


def test_plans_without_chunks_keep_the_encoder_going_and_a_repeat_waits_for_nothing() -> None:
    sched, worker = make(encode_steps=2)
    sched.handle(image_req("a", IDS, [CAT, DOG]))
    assert run_to_idle(sched, worker) == 4
    assert chunk_keys(worker.plans) == [[], [], ["a#0"], ["a#0"]]
    assert encoded(worker.plans) == [[CAT.hash, DOG.hash], [], [], []]
    # The same images again (another question): ready, so admitted at once, nothing sent.
    sched.handle(image_req("c", [*IDS[:-2], 30, 31], [CAT, DOG]))
    run_to_idle(sched, worker)
    assert chunk_keys(worker.plans[4:]) == [["c#0"], ["c#0"]]
    assert encoded(worker.plans[4:]) == [[], []]
    assert_idle_invariant(sched)


def test_at_most_max_in_flight_images_are_with_the_workers() -> None:
    n = MAX_IN_FLIGHT + 2
    sched, worker = make(num_slots=256, encode_steps=1)
    for i in range(n):
        sched.handle(image_req(f"r{i}", [5, *[PAD] * 4, 6], [image(f"img{i}", 1, 4)], max_new=1))
    run_to_idle(sched, worker)
    sent = encoded(worker.plans)
    # Step 0: the first 8 images (ready at once here); step 1: their prompts, and the other 2
    # images; step 2: the last 2 prompts.
    assert [len(s) for s in sent] == [MAX_IN_FLIGHT, 2, 0]
    assert sent[0] + sent[1] == [image(f"img{i}", 1, 4).hash for i in range(n)]
    assert [len(k) for k in chunk_keys(worker.plans)] == [0, MAX_IN_FLIGHT, 2]
    assert_idle_invariant(sched)


def test_abort_while_encoding_finishes_the_image_and_leaks_nothing() -> None:
    sched, worker = make(encode_steps=3)
    sched.handle(image_req("a", IDS, [CAT, DOG]))
    sched.process_result(worker.step(sched.schedule()))  # type: ignore[arg-type]
    sched.handle(AbortRequest("a", None, "client"))
    assert [o.finish_reason for o in sched.outputs] == ["abort"]
    # No sequence left, but the workers still hold the images: steps go on until they are
    # ready (then cached for a retry), and no prompt is ever prefilled.
    assert run_to_idle(sched, worker) == 2
    assert chunk_keys(worker.plans) == [[], [], []]
    assert worker.encoded == {CAT.hash, DOG.hash} and not sched.has_work
    assert_idle_invariant(sched)


def test_without_encode_ahead_images_are_prefilled_at_once() -> None:
    sched, worker = make()
    sched.handle(image_req("a", IDS, [CAT, DOG]))
    run_to_idle(sched, worker)
    assert chunk_keys(worker.plans) == [["a#0"], ["a#0"]]
    assert encoded(worker.plans) == [[], []]
