"""Llama 3.2 Vision (Mllama) against transformers on a tiny checkpoint, through the worker and
the real scheduler: the processor's ids and tiles equal transformers'; greedy tokens identical
and prefill logits close for text only, one image, two images, two adjacent images and a second
turn; the image changes the output; chunked prefill across images; prefix hits only with the
same images (the cross-attention K/V kept in the image slot or recomputed from cached
vision states); the image-slot pool back to full after finish, abort and retraction, admission
waiting for slots and a request with more different images than the pool refused (sharing
itself: test_mllama_shared_images.py); both checkpoint layouts and configs load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from mllama_helpers import (
    CASES,
    N_NEW,
    OTHER_PAIR,
    SLOTS,
    TILES,
    MllamaReference,
    Prompt,
    free_image_slots,
    random_image,
    scheduler,
    serve,
    tokens_of,
    tp_rank_prefill,
)
from safetensors.torch import load_file, save_file
from tiny_mllama import make_other_layout_mllama
from worker_driver import Driver, greedy, make_runner, prefill_logits

from fovea.common.messages import (
    AbortRequest,
    ImageInput,
    RequestError,
    StepPlan,
    TokenizedRequest,
)
from fovea.common.model_config import ModelConfigError, read_model_info
from fovea.common.sampling import SamplingParams
from fovea.tokenizer_service.processors import load_processor
from fovea.worker.cross_attention import NO_END, image_ranges
from fovea.worker.loader import WeightLoadError
from fovea.worker.model_runner import ModelRunner

SHORT = 8  # output tokens where the scheduler, not the length of the output, is under test


@pytest.fixture(scope="module", autouse=True)
def _threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def ref(tiny_mllama: Path) -> MllamaReference:
    return MllamaReference(tiny_mllama)


@pytest.fixture(scope="module")
def runner(tiny_mllama: Path) -> ModelRunner:
    return make_runner(tiny_mllama, max_running_requests=SLOTS, max_images_per_request=2)


@pytest.fixture(scope="module")
def prompts(ref: MllamaReference, tiny_mllama: Path) -> dict[str, Prompt]:
    return {name: Prompt(ref, tiny_mllama, turns) for name, turns in CASES.items()}


@pytest.fixture(scope="module")
def reference(ref: MllamaReference, prompts: dict[str, Prompt]) -> dict[str, list[int]]:
    return {name: ref.greedy(p.hf_ids, p.hf_kwargs, N_NEW) for name, p in prompts.items()}


# ---------------------------------------------------------------- processor


@pytest.mark.parametrize("case", list(CASES))
def test_processor_matches_transformers(prompts: dict[str, Prompt], case: str) -> None:
    p = prompts[case]
    assert p.ids == p.hf_ids
    assert p.ids[0] == 3 and p.ids.count(3) == 1  # one <|begin_of_text|>
    assert [p.ids[img.offset] for img in p.images] == [400] * len(p.images)  # <|image|>
    kw = p.hf_kwargs
    for k, (img, name) in enumerate(zip(p.images, p.names, strict=True)):
        ar_id, tiles = TILES[name]
        assert img.grid == [ar_id, tiles] and img.num_tokens == 1
        assert img.pixel_values.shape == (tiles, 3, 28, 28)
        assert img.pixel_values.dtype == np.float32 and img.pixel_values.flags.c_contiguous
        assert np.array_equal(img.pixel_values, kw["pixel_values"][0, k, :tiles].numpy())
        assert int(kw["aspect_ratio_ids"][0, k]) == ar_id
        assert kw["aspect_ratio_mask"][0, k].tolist() == [1] * tiles + [0] * (4 - tiles)


def test_processor_tiles_like_transformers_at_many_sizes(
    ref: MllamaReference, tiny_mllama: Path
) -> None:
    """Bit-identical tiles, aspect ratio ids and tile counts for 1 to 4 tiles, tiny and
    extreme images, upscaling and downscaling, grey and transparent ones."""
    processor = load_processor(
        str(tiny_mllama), json.loads((tiny_mllama / "config.json").read_text())
    )
    assert processor is not None
    sizes = [(1, 1), (28, 56), (56, 28), (100, 30), (30, 100), (57, 57), (300, 7), (85, 29)]
    images = [random_image(10 + i, h, w) for i, (h, w) in enumerate(sizes)]
    images += [images[1].convert("L"), images[2].convert("RGBA")]
    seen = set()
    for image in images:
        ours = processor.preprocess(image)
        theirs = ref.image_processor(images=[[image]], return_tensors="np")
        ar_id, tiles = ours.grid
        assert ar_id == theirs["aspect_ratio_ids"][0, 0] and tiles == theirs["num_tiles"][0][0]
        assert np.array_equal(ours.pixel_values, theirs["pixel_values"][0, 0, :tiles])
        seen.add(tiles)
    assert seen == {1, 2, 3, 4}


def test_image_ranges_follow_transformers_token_mask() -> None:
    """Which image each position attends to, ours against transformers' processor; positions
    past the prompt (generated tokens) attend as its last token does."""
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense,
        get_cross_attention_token_mask,
    )

    length = 12
    for offsets in ([3], [3, 7], [3, 4, 9], [2, 3, 4], [1, 5, 6], [0, 11]):
        ids = [7] * length
        for o in offsets:
            ids[o] = 400
        sparse = get_cross_attention_token_mask(ids, 400)
        dense = convert_sparse_cross_attention_mask_to_dense(
            [sparse], [[1] * len(offsets)], 1, length
        )[0, :, :, 0]  # [length, images]
        ranges = image_ranges(offsets)
        ours = np.array([[lo <= t < hi for lo, hi in ranges] for t in range(length + 3)])
        assert np.array_equal(ours[:length], dense.astype(bool)), offsets
        assert (ours[length:] == dense[-1].astype(bool)).all(), offsets
    assert image_ranges([3, 4, 9]) == [(3, 9), (4, 9), (9, NO_END)]


# ---------------------------------------------------------------- fidelity


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_matches_transformers(
    runner: ModelRunner, prompts: dict[str, Prompt], reference: dict[str, list[int]], case: str
) -> None:
    assert greedy(runner, prompts[case]) == reference[case]
    assert runner.seqs == {} and free_image_slots(runner) == SLOTS


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_logits_match_transformers(
    runner: ModelRunner, ref: MllamaReference, prompts: dict[str, Prompt], case: str
) -> None:
    p = prompts[case]
    ours, theirs = prefill_logits(runner, p), ref.logits(p.hf_ids, p.hf_kwargs)
    assert ours.shape == (len(p.ids), 400)
    assert (ours - theirs).abs().max().item() < 1e-3


def test_the_image_matters(
    runner: ModelRunner, ref: MllamaReference, tiny_mllama: Path, prompts: dict[str, Prompt],
    reference: dict[str, list[int]],
) -> None:  # fmt: skip
    """Image D instead of A (same size, same text): every logit row changes (rows before the
    image too, as in transformers), ours still match transformers', and the generated tokens
    differ."""
    a = prompts["one_image"]
    d = Prompt(ref, tiny_mllama, [("user", [("image", "D"), "Describe the image."])])
    assert a.ids == d.ids and a.images[0].hash != d.images[0].hash
    la, ld = prefill_logits(runner, a), prefill_logits(runner, d)
    assert (la - ld).abs().amax(dim=1).min().item() > 0.5
    assert (ld - ref.logits(d.hf_ids, d.hf_kwargs)).abs().max().item() < 1e-3
    assert greedy(runner, d) != reference["one_image"]


def test_text_and_image_sequences_in_one_batch(
    runner: ModelRunner, prompts: dict[str, Prompt], reference: dict[str, list[int]]
) -> None:
    """Text, one-image and two-image sequences prefilled and decoded together: cross-attention
    layers run on the image sequences' rows only (the text rows pass them unchanged, as a
    text-only request skips them in transformers), and the decode rows attend in one call,
    the one-image row padded to two images' keys (masked). Image A of both image sequences
    is in one slot (0), its K/V computed once."""
    names = {"t": "text", "o": "one_image", "i": "two_images"}
    d = Driver(runner)
    new = [prompts[n].new_seq(k) for k, n in names.items()]
    assert runner.cross is not None
    a, b = prompts["two_images"].images
    stale = (runner.cross.slot_image[0] != a.hash) + (runner.cross.slot_image[1] != b.hash)
    res = d.step(new, [(k, len(prompts[n].ids), True) for k, n in names.items()])
    out = {k: [tok] for k, tok in zip(res.keys, res.token_ids, strict=True)}
    assert runner.cross.users == [2, 1, 0] and free_image_slots(runner) == SLOTS - 2
    assert res.cross_kv_computed == stale  # slots still holding A and B are not refilled
    for _ in range(N_NEW - 1):
        res = d.step([], [(k, 1, True) for k in names])
        for k, tok in zip(res.keys, res.token_ids, strict=True):
            out[k].append(tok)
    runner.step(StepPlan(0, [], [], list(names)))
    assert out == {k: reference[n] for k, n in names.items()}
    assert free_image_slots(runner) == SLOTS


def test_kv_pool_holds_only_self_attention_layers(runner: ModelRunner) -> None:
    """5 layers, cross-attention at 1 and 3: 3 token-KV layers; 3 image slots of 4 tiles x 5
    patches for the 2 cross layers (2 KV heads of 32)."""
    assert runner.model.config.num_layers == 3 and len(runner.pool.k) == 3
    ids = [getattr(layer.self_attn, "layer_id", None) for layer in runner.model.model.layers[::2]]
    assert ids == [0, 1, 2]
    assert runner.cross is not None and runner.cross_image_slots == SLOTS
    assert tuple(runner.cross.pool.k.shape) == (2, SLOTS, 20, 2, 32)


# ---------------------------------------------------------------- with the real scheduler


def test_chunked_prefill_across_images(
    runner: ModelRunner, prompts: dict[str, Prompt], reference: dict[str, list[int]]
) -> None:
    """Chunks of 4 tokens: the images' K/V are filled at the first chunk and read by the
    later ones."""
    p = prompts["two_images"]
    sched = scheduler(runner, chunked_prefill_size=4)
    plans = serve(runner, sched, [p.request("r", SHORT)])
    sizes = [len(c.new_slots) for plan in plans for c in plan.chunks]
    n = len(p.ids)
    assert sizes[: -(SHORT - 1)] == [4] * (n // 4) + ([n % 4] if n % 4 else [])
    # The first chunk holds no image token (its rows see both images' keys), and the two
    # images' tokens fall in different chunks.
    first, second = (img.offset // 4 for img in p.images)
    assert 0 < first < second
    assert tokens_of(sched, "r") == reference["two_images"][:SHORT]


def test_prefix_hits_only_with_the_same_images(
    runner: ModelRunner, ref: MllamaReference, tiny_mllama: Path, prompts: dict[str, Prompt],
    reference: dict[str, list[int]],
) -> None:  # fmt: skip
    """A text-only prompt shares its first tokens with the image prompt but is no hit for it
    (every token's KV depends on the images); the same image and text again is a hit up to
    the last token, with no second vision-encoder run (K/V kept in the freed image slot, or
    recomputed from the cached vision states); another image with the same text is no hit at
    all."""
    text, a = prompts["text"], prompts["one_image"]
    assert text.ids[:2] == a.ids[:2]
    sched = scheduler(runner)
    serve(runner, sched, [text.request("t", 1)])
    first = serve(runner, sched, [a.request("a1", 1)])
    assert first[0].new[0].prefix_slots == []
    encoded = runner.images_encoded
    again = serve(runner, sched, [a.request("a2", SHORT)])
    assert len(again[0].new[0].prefix_slots) == len(a.ids) - 1
    assert runner.images_encoded == encoded
    assert tokens_of(sched, "a2") == reference["one_image"][:SHORT]
    d = Prompt(ref, tiny_mllama, [("user", [("image", "D"), "Describe the image."])])
    cold = d.images[0].hash not in runner.mm_cache
    other = serve(runner, sched, [d.request("d", SHORT)])
    assert other[0].new[0].prefix_slots == []
    assert runner.images_encoded == encoded + cold
    assert tokens_of(sched, "d") == ref.greedy(d.hf_ids, d.hf_kwargs, SHORT)
    assert sched.cache_hit_tokens == len(a.ids) - 1


def test_image_slots_back_to_full_after_abort(
    runner: ModelRunner, prompts: dict[str, Prompt]
) -> None:
    p = prompts["two_images"]
    sched = scheduler(runner)
    assert sched.cross_images is not None
    sched.handle(p.request("x"))
    plan = sched.schedule()
    assert plan is not None
    sched.process_result(runner.step(plan))
    assert (sched.cross_images.used, free_image_slots(runner)) == (2, SLOTS - 2)
    sched.handle(AbortRequest("x"))
    assert sched.cross_images.used == 0 and sched.plans.pending_drops == ["x#0"]
    runner.step(StepPlan(0, [], [], sched.plans.pending_drops))
    assert free_image_slots(runner) == SLOTS and runner.seqs == {}


def test_retraction_frees_and_retakes_image_slots(
    runner: ModelRunner, prompts: dict[str, Prompt], reference: dict[str, list[int]]
) -> None:
    """KV memory for one sequence and a half: the newer one is retracted (its image slots
    freed, their K/V kept), re-admitted from its cached prefix into them, and both still
    give transformers' tokens."""
    a, c = prompts["one_image"], prompts["second_turn"]
    need = max(len(a.ids), len(c.ids)) + N_NEW
    sched = scheduler(runner, num_slots=need + 12)
    serve(runner, sched, [a.request("a"), c.request("c")])
    assert sched.num_retractions >= 1
    assert tokens_of(sched, "a") == reference["one_image"]
    assert tokens_of(sched, "c") == reference["second_turn"]


def test_admission_waits_for_image_slots(
    runner: ModelRunner, ref: MllamaReference, tiny_mllama: Path, prompts: dict[str, Prompt],
    reference: dict[str, list[int]],
) -> None:  # fmt: skip
    """Two requests of 2 different images each with 3 slots: the second is admitted only
    after the first finishes (serve checks the counts every step), into the never-used slot
    and then the longest-free one; both give transformers' tokens."""
    p = prompts["two_images"]
    q = Prompt(ref, tiny_mllama, OTHER_PAIR)
    sched = scheduler(runner)
    plans = serve(runner, sched, [p.request("x", SHORT), q.request("y", SHORT)])
    admitted = [[n.key for n in plan.new] for plan in plans]
    assert admitted[0] == ["x#0"] and admitted.index(["y#0"]) == SHORT
    assert plans[0].new[0].image_slots == [0, 1] and plans[SHORT].new[0].image_slots == [2, 0]
    assert tokens_of(sched, "x") == reference["two_images"][:SHORT]
    assert tokens_of(sched, "y") == ref.greedy(q.hf_ids, q.hf_kwargs, SHORT)


def test_more_images_than_the_pool_is_refused(
    runner: ModelRunner, prompts: dict[str, Prompt]
) -> None:
    """Four different images cannot fit 3 slots; four copies of one image take one slot."""
    img = prompts["one_image"].images[0]
    ids = [3, 400, 400, 400, 400, 9]
    hashes = [bytes([k]) + img.hash[1:] for k in range(4)]
    images = [ImageInput(h, 1 + k, 1, img.pixel_values, img.grid) for k, h in enumerate(hashes)]
    sched = scheduler(runner)
    sp = SamplingParams(temperature=0.0, max_new_tokens=4)
    sched.handle(TokenizedRequest(rid="big", index=0, input_ids=ids, sampling=sp, images=images))
    assert sched.to_server == [
        RequestError(
            rid="big",
            message="request big has 4 different images but the model's cross-attention "
            "state holds at most 3 at once; send fewer images",
            status=400,
        )
    ]
    assert not sched.has_work
    same = [ImageInput(img.hash, 1 + k, 1, img.pixel_values, img.grid) for k in range(4)]
    req = TokenizedRequest(rid="same", index=0, input_ids=ids, sampling=sp, images=same)
    plans = serve(runner, sched, [req])
    assert plans[0].new[0].image_slots == [0, 0, 0, 0] and len(sched.to_server) == 1


# ---------------------------------------------------------------- checkpoints and configs


def test_other_layout_and_flat_rope_config_load_the_same_model(
    runner: ModelRunner, tiny_mllama: Path, prompts: dict[str, Prompt], tmp_path: Path
) -> None:
    """The v5 module-tree names with the older flat rope_theta + rope_scaling config give
    the same logits; a missing tensor is an error naming it."""
    out = make_other_layout_mllama(tiny_mllama, tmp_path / "other")
    cfg = json.loads((out / "config.json").read_text())
    assert "rope_scaling" in cfg["text_config"] and "rope_parameters" not in cfg["text_config"]
    weights = load_file(str(out / "model.safetensors"))
    assert "model.language_model.layers.1.cross_attn.q_proj.weight" in weights
    p = prompts["two_images"]
    diff = prefill_logits(make_runner(out), p) - prefill_logits(runner, p)
    assert diff.abs().max().item() < 1e-5
    del weights["model.vision_model.global_transformer.layers.1.gate_ffn"]
    save_file(weights, str(out / "model.safetensors"))
    with pytest.raises(
        WeightLoadError, match=r"vision_model\.global_transformer\.layers\.1\.gate_ffn"
    ):
        make_runner(out)


def test_processor_and_tower_must_agree(tiny_mllama: Path, tmp_path: Path) -> None:
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(tiny_mllama / name, tmp_path / name)
    info = read_model_info(str(tmp_path))
    assert (info.architecture, info.vocab_size, info.eos_token_ids) == (
        "MllamaForConditionalGeneration", 400, [4, 7],
    )  # fmt: skip
    pp = json.loads((tmp_path / "preprocessor_config.json").read_text())
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**pp, "max_image_tiles": 2}))
    with pytest.raises(ModelConfigError, match="max_image_tiles 2 does not match the tower's 4"):
        read_model_info(str(tmp_path))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(pp))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["vision_config"]["vision_output_dim"] = 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelConfigError, match="vision_output_dim 128 is not hidden_size 64"):
        read_model_info(str(tmp_path))


# ---------------------------------------------------------------- tensor parallel


@pytest.mark.slow
def test_tp2_matches_transformers(
    tiny_mllama: Path, ref: MllamaReference, prompts: dict[str, Prompt], tmp_path: Path
) -> None:
    """Two gloo ranks: heads of both towers, the cross-attention q/k/v (KV heads split) and
    the MLPs sharded; prefill logits and the next tokens equal transformers'."""
    import torch.multiprocessing as mp

    p = prompts["two_images"]
    case = tmp_path / "case.pt"
    fields = [(i.hash, i.offset, i.num_tokens, i.pixel_values, i.grid) for i in p.images]
    torch.save({"ids": p.ids, "images": fields}, case)
    mp.spawn(
        tp_rank_prefill, args=(2, str(tiny_mllama), str(tmp_path / "init"), str(case)), nprocs=2
    )
    out = torch.load(f"{case}.out")
    assert (out["logits"] - ref.logits(p.hf_ids, p.hf_kwargs)).abs().max().item() < 1e-3
    assert out["tokens"] == ref.greedy(p.hf_ids, p.hf_kwargs, 4)
