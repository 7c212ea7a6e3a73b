"""Whole images (models whose image tokens attend to each other in full, e.g. Gemma 3): a
prefill chunk never ends inside an image, and a prefix hit that ends inside one is cut back to
the image's start. Exact plans against the fake worker."""

from __future__ import annotations

import pytest
from fake_worker import assert_idle_invariant, image, image_req, make, run_to_idle

from fovea.common.config import ServerArgs, parse_args
from fovea.common.messages import ScheduledChunk, TokenizedRequest
from fovea.common.model_config import ModelInfo
from fovea.scheduler.policy import SchedulerConfig, whole_image_chunk, whole_image_prefix

PAD = 9


# 3 text tokens, image "cat" at [3, 7), 2 text, image "dog" at [9, 15), 2 text: 17 tokens.
IDS = [5, 6, 7, *[PAD] * 4, 8, 9, *[PAD] * 6, 10, 11]
IMAGES = [image("cat", 3, 4), image("dog", 9, 6)]


def chunk_sizes(worker: object) -> list[int]:
    return [len(c.new_slots) for p in worker.plans for c in p.chunks]  # type: ignore[attr-defined]


def test_policy_functions_exact() -> None:
    # Chunk [0, 5) would end inside cat [3, 7): it stops at 3.
    assert whole_image_chunk(IMAGES, 0, 5) == 3
    # Starting at cat, 2 tokens would split it: the whole image (4) is taken, or nothing.
    assert whole_image_chunk(IMAGES, 3, 2) == 4
    assert whole_image_chunk(IMAGES, 3, 2, extend=False) == 0
    # Ends at an image boundary or outside images: unchanged.
    assert [whole_image_chunk(IMAGES, 0, n) for n in (3, 7, 8, 9, 15, 17)] == [3, 7, 8, 9, 15, 17]
    assert whole_image_chunk(IMAGES, 7, 5) == 2  # [7, 12) ends inside dog [9, 15)
    # Prefixes ending inside an image go back to its start, page-aligned down.
    assert [whole_image_prefix(IMAGES, n, 1) for n in (2, 3, 5, 7, 11, 15, 16)] == [
        2, 3, 3, 7, 9, 15, 16,
    ]  # fmt: skip
    assert whole_image_prefix(IMAGES, 12, 4) == 8
    # Adjacent images: aligning down may land inside the previous one, which is cut too.
    adjacent = [image("a", 2, 4), image("b", 6, 4)]
    assert whole_image_prefix(adjacent, 8, 4) == 0


def test_chunks_end_before_images_exact_plans() -> None:
    sched, worker = make(chunked_prefill_size=5, whole_images=True)
    sched.handle(image_req("a", IDS, IMAGES))
    run_to_idle(sched, worker)
    # [0, 3) stops before cat; [3, 8) holds cat whole; [8, 9) stops before dog; [9, 15)
    # takes dog whole past the cap of 5; [15, 17) ends the prompt; then one decode.
    assert chunk_sizes(worker) == [3, 5, 1, 6, 2, 1]
    assert [p.chunks for p in worker.plans[:2]] == [
        [ScheduledChunk("a#0", [1, 2, 3], False)],
        [ScheduledChunk("a#0", [4, 5, 6, 7, 8], False)],
    ]
    assert_idle_invariant(sched)


def test_without_the_flag_chunks_split_images() -> None:
    sched, worker = make(chunked_prefill_size=5)
    sched.handle(image_req("a", IDS, IMAGES))
    run_to_idle(sched, worker)
    assert chunk_sizes(worker) == [5, 5, 5, 2, 1]


def test_prefix_hit_inside_an_image_is_cut_to_its_start() -> None:
    sched, worker = make(page_size=2, whole_images=True)
    sched.handle(image_req("a", IDS, IMAGES))
    run_to_idle(sched, worker)
    # Keep 12 of the cached tokens: the tree now ends inside dog [9, 15).
    sched.allocator.free(sched.cache.evict(sched.cache.total_size - 12))
    assert sched.cache.total_size == 12
    sched.handle(image_req("b", IDS, IMAGES))
    run_to_idle(sched, worker)
    new = worker.plans[-2].new[0]
    assert new.key == "b#0" and len(new.prefix_slots) == 8  # dog's start 9, page-aligned down
    assert [o.cached_tokens for o in sched.outputs if o.rid == "b"][-1] == 8
    assert_idle_invariant(sched)


def test_prefix_hit_inside_an_image_is_used_whole_without_the_flag() -> None:
    sched, worker = make(page_size=2)
    sched.handle(image_req("a", IDS, IMAGES))
    run_to_idle(sched, worker)
    sched.allocator.free(sched.cache.evict(sched.cache.total_size - 12))
    sched.handle(image_req("b", IDS, IMAGES))
    run_to_idle(sched, worker)
    assert len(worker.plans[-2].new[0].prefix_slots) == 12


@pytest.mark.parametrize(
    ("num_slots", "b"),
    [
        # Admission shrinks to the memory left: b's first chunk stops before its image.
        (24, image_req("b", [*IDS[:7], 1, 2], IMAGES[:1], max_new=6)),
        # A running prefill shrinks to the memory left: a's chunk stops before "dog".
        (20, image_req("b", [1] * 10, [], max_new=2)),
    ],
)
def test_short_memory_never_ends_a_chunk_inside_an_image(
    num_slots: int, b: TokenizedRequest
) -> None:
    """Memory runs short, chunks shrink and sequences are retracted, yet no chunk (nor a
    re-admitted prefix) ends inside an image."""
    sched, worker = make(num_slots=num_slots, chunked_prefill_size=8, whole_images=True)
    reqs = [image_req("a", IDS, IMAGES, max_new=6 if num_slots == 24 else 2), b]
    for r in reqs:
        sched.handle(r)
    run_to_idle(sched, worker)
    images = {f"{r.rid}#0": r.images for r in reqs}
    done: dict[str, int] = {}
    ends = []
    for plan in worker.plans:
        for key in plan.dropped:
            done.pop(key)
        for new in plan.new:
            done[new.key] = len(new.prefix_slots)
        for c in plan.chunks:
            done[c.key] += len(c.new_slots)
            ends.append(done[c.key])
            assert not any(i.offset < done[c.key] < i.offset + i.num_tokens for i in images[c.key])
    assert len(ends) >= 6
    assert_idle_invariant(sched)


def test_config_from_args_knows_which_models_need_whole_images() -> None:
    args = ServerArgs(model_path="unused")

    def info(arch: str) -> ModelInfo:
        return ModelInfo(
            path="", architecture=arch, model_type="", context_length=64, vocab_size=9,
            eos_token_ids=[],
        )  # fmt: skip

    gemma = SchedulerConfig.from_args(args, info("Gemma3ForConditionalGeneration"), 8, "cuda")
    qwen = SchedulerConfig.from_args(args, info("Qwen2VLForConditionalGeneration"), 8, "cuda")
    assert gemma.whole_images and not qwen.whole_images


def test_config_from_args_prefill_batch_auto_per_device() -> None:
    model = ModelInfo(
        path="", architecture="LlamaForCausalLM", model_type="", context_length=64,
        vocab_size=9, eos_token_ids=[],
    )  # fmt: skip

    def target(device: str, *flags: str) -> int:
        args = parse_args(["--model-path", "unused", *flags], env={})
        return SchedulerConfig.from_args(args, model, 8, device).batch_target

    assert target("cpu") == 32
    assert target("cuda") == 2048
    assert target("cuda", "--max-prefill-tokens", "4096") == 4096
    assert target("cpu", "--prefill-batch-tokens", "300") == 300
