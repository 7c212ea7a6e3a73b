"""Qwen2-VL and Qwen2.5-VL against transformers on tiny checkpoints: M-RoPE positions equal,
greedy tokens identical, prefill logits close, for text, one image, two images and a second
turn; images split across chunks or prefix hits, the embedding cache, both weight layouts."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from worker_driver import GREEDY, Driver, greedy, make_runner, prefill_logits

from fovea.common.messages import ImageInput, NewSequence, ScheduledChunk, StepPlan
from fovea.common.model_config import read_model_info
from fovea.tokenizer_service.processors import load_processor
from fovea.worker.loader import WeightLoadError
from fovea.worker.model_runner import ModelRunner

N_NEW = 32
START, END, PAD = 3, 4, 5  # <|vision_start|>, <|vision_end|>, <|image_pad|> in tiny_models


def _image(seed: int, height: int, width: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


# A: 8x8 patches (16 tokens); B: 12x18 (54 tokens, windows of uneven size); D: A's size.
IMAGES = {"A": _image(1, 112, 112), "B": _image(2, 300, 400), "D": _image(3, 112, 112)}

Part = str | tuple[str, str]  # text, or ("image", name)
CASES: dict[str, list[tuple[str, list[Part]]]] = {
    "text": [("user", ["Paris is the capital of France. Numbers like 12345?"])],
    "one_image": [("user", [("image", "A"), "Describe the image."])],
    "two_images": [
        ("user", ["Compare", ("image", "A"), "with", ("image", "B"), "please."]),
    ],
    "second_turn": [
        ("user", [("image", "B"), "What is this?"]),
        ("assistant", ["The quick brown fox."]),
        ("user", ["And the dog?"]),
    ],
}


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def model_path(request: pytest.FixtureRequest) -> Path:
    torch.set_num_threads(2)
    return request.getfixturevalue(f"tiny_{request.param}")  # type: ignore[no-any-return]


def architecture(model_path: Path) -> str:
    return str(json.loads((model_path / "config.json").read_text())["architectures"][0])


@pytest.fixture(scope="module")
def hf_model(model_path: Path) -> Any:
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    is_25 = architecture(model_path) == "Qwen2_5_VLForConditionalGeneration"
    cls = Qwen2_5_VLForConditionalGeneration if is_25 else Qwen2VLForConditionalGeneration
    return cls.from_pretrained(str(model_path), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def runner(model_path: Path) -> ModelRunner:
    return make_runner(model_path)


class Prompt:
    """Token ids with each image's placeholder expanded, the ImageInputs as Fovea's processor
    makes them (raw uint8 patches that the tower normalizes in its patch embedding), and
    transformers' inputs (its processor's float32 pixel_values) for the same prompt."""

    def __init__(self, model_path: Path, turns: list[tuple[str, list[Part]]]) -> None:
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil,
        )

        tok = AutoTokenizer.from_pretrained(str(model_path))
        proc = Qwen2VLImageProcessorPil.from_pretrained(str(model_path))
        config = json.loads((model_path / "config.json").read_text())
        ours = load_processor(str(model_path), config)
        assert ours is not None
        messages = [
            {
                "role": role,
                "content": [
                    {"type": "image"} if isinstance(p, tuple) else {"type": "text", "text": p}
                    for p in parts
                ],
            }
            for role, parts in turns
        ]
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids: list[int] = tok.encode(text, add_special_tokens=False)
        names = [p[1] for _, parts in turns for p in parts if isinstance(p, tuple)]
        self.ids: list[int] = []
        self.images: list[ImageInput] = []
        pixels, grids = [], []
        for tid in ids:
            if tid != PAD:
                self.ids.append(tid)
                continue
            name = names[len(self.images)]
            feats = proc(images=[IMAGES[name]], return_tensors="np")
            pv = feats["pixel_values"].astype(np.float32)
            grid = [int(g) for g in feats["image_grid_thw"][0]]
            got = ours.preprocess(IMAGES[name])
            assert got.grid == grid and got.pixel_values.dtype == np.uint8
            n = got.num_tokens
            digest = hashlib.blake2b(IMAGES[name].tobytes(), digest_size=32).digest()
            scale, shift = list(got.pixel_scale), list(got.pixel_shift)
            self.images.append(
                ImageInput(
                    digest,
                    len(self.ids),
                    n,
                    got.pixel_values,
                    grid,
                    pixel_scale=scale,
                    pixel_shift=shift,
                )
            )
            self.ids.extend([PAD] * n)
            pixels.append(pv)
            grids.append(grid)
        assert len(self.images) == len(names) and self.ids.count(PAD) == sum(
            img.num_tokens for img in self.images
        )
        self.hf_kwargs: dict[str, torch.Tensor] = {}
        if self.images:
            self.hf_kwargs = {
                "pixel_values": torch.from_numpy(np.concatenate(pixels)),
                "image_grid_thw": torch.tensor(grids),
                "mm_token_type_ids": torch.tensor([[int(t == PAD) for t in self.ids]]),
            }

    def new_seq(self, key: str, prefix_slots: list[int] | None = None) -> NewSequence:
        return NewSequence(key, self.ids, len(self.ids), GREEDY, prefix_slots or [], self.images)


@pytest.fixture(scope="module")
def prompts(model_path: Path) -> dict[str, Prompt]:
    return {name: Prompt(model_path, turns) for name, turns in CASES.items()}


@pytest.fixture(scope="module")
def reference(hf_model: Any, prompts: dict[str, Prompt]) -> dict[str, list[int]]:
    """transformers' greedy continuation of each prompt (eos does not stop it)."""
    out = {}
    for name, p in prompts.items():
        ids = hf_model.generate(
            torch.tensor([p.ids]),
            attention_mask=torch.ones(1, len(p.ids), dtype=torch.int64),
            do_sample=False,
            max_new_tokens=N_NEW,
            min_new_tokens=N_NEW,
            eos_token_id=None,
            pad_token_id=0,
            **p.hf_kwargs,
        )
        out[name] = ids[0, len(p.ids) :].tolist()
        assert len(out[name]) == N_NEW
        # generate ran on M-RoPE positions: its rope delta is ours (non-zero with images).
        delta = hf_model.model.rope_deltas
        assert delta is not None
        assert int(delta) == hf_rope_index(hf_model, p)[1]
    return out


def hf_rope_index(hf_model: Any, p: Prompt) -> tuple[torch.Tensor, int]:
    if not p.images:
        return torch.arange(len(p.ids)).expand(3, -1), 0
    kw = p.hf_kwargs
    pos, delta = hf_model.model.get_rope_index(
        torch.tensor([p.ids]), kw["mm_token_type_ids"], kw["image_grid_thw"]
    )
    return pos[:, 0], int(delta)


@pytest.mark.parametrize("case", list(CASES))
def test_mrope_positions_match_transformers(
    runner: ModelRunner, hf_model: Any, prompts: dict[str, Prompt], case: str
) -> None:
    p = prompts[case]
    ours, delta = runner.model.mrope_positions(p.ids, p.images)
    theirs, their_delta = hf_rope_index(hf_model, p)
    assert ours.shape == (3, len(p.ids)) and ours.dtype == torch.int64
    assert torch.equal(ours, theirs) and delta == their_delta
    flat = torch.arange(len(p.ids)).expand(3, -1)
    # An image of gh x gw merged patches uses max(gh, gw) positions for gh * gw tokens.
    expected_delta = sum(max(img.grid[1], img.grid[2]) // 2 - img.num_tokens for img in p.images)
    assert delta == expected_delta
    assert torch.equal(ours, flat) == (not p.images)


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_matches_transformers(
    runner: ModelRunner, prompts: dict[str, Prompt], reference: dict[str, list[int]], case: str
) -> None:
    assert greedy(runner, prompts[case]) == reference[case]
    assert runner.seqs == {}


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_logits_match_transformers(
    runner: ModelRunner, hf_model: Any, prompts: dict[str, Prompt], case: str
) -> None:
    p = prompts[case]
    ours = prefill_logits(runner, p)
    with torch.no_grad():
        theirs = hf_model(torch.tensor([p.ids]), **p.hf_kwargs).logits[0]
    assert ours.shape == (len(p.ids), 512)
    assert (ours - theirs).abs().max().item() < 1e-3


def test_the_image_matters(runner: ModelRunner, model_path: Path) -> None:
    """Another image (same size, same text) changes the logits after it: the vision path is
    live, so the comparisons above can fail."""
    a = Prompt(model_path, CASES["one_image"])
    b = Prompt(model_path, [("user", [("image", "D"), "Describe the image."])])
    assert a.ids == b.ids and a.images[0].hash != b.images[0].hash
    start = a.images[0].offset
    diff = (prefill_logits(runner, a) - prefill_logits(runner, b))[start:].abs().max().item()
    assert diff > 0.05


def test_windows_split_the_test_images(model_path: Path, prompts: dict[str, Prompt]) -> None:
    """Qwen2.5-VL: window attention really is exercised (several windows per image, uneven
    ones for image B)."""
    from fovea.worker.models.qwen2_5_vl import window_order

    if architecture(model_path) != "Qwen2_5_VLForConditionalGeneration":
        pytest.skip("Qwen2.5-VL only")
    grids = [img.grid for img in prompts["two_images"].images]  # A [1, 8, 8], B [1, 12, 18]
    order, bounds = window_order(grids, 2, 2, torch.device("cpu"))
    sizes = np.diff(bounds).tolist()
    assert sizes == [16] * 4 + ([16] * 4 + [8]) * 3
    assert sorted(order.tolist()) == list(range(16 + 54)) and order.tolist()[:4] == [0, 1, 4, 5]


def test_image_split_across_chunks(runner: ModelRunner, prompts: dict[str, Prompt]) -> None:
    p = prompts["two_images"]
    a, b = p.images
    whole = prefill_logits(runner, p)[-1]
    cuts = [a.offset + 5, b.offset + 20, len(p.ids)]  # inside image A, inside image B, end
    d = Driver(runner)
    sizes = [cuts[0], cuts[1] - cuts[0], cuts[2] - cuts[1]]
    d.step([p.new_seq("c")], [("c", sizes[0], False)])
    d.step([], [("c", sizes[1], False)])
    plan = StepPlan(0, [], [ScheduledChunk("c", d.alloc("c", sizes[2]), True)], [])
    last, _ = runner.forward(plan)
    runner.step(StepPlan(0, [], [], ["c"]))
    assert (last[0] - whole).abs().max().item() < 1e-4


def test_prefix_hit_inside_an_image(
    runner: ModelRunner, prompts: dict[str, Prompt], reference: dict[str, list[int]]
) -> None:
    """'y' reuses x's KV up to the middle of the image and computes the rest (the image's
    second half from the embedding cache): same tokens as alone."""
    p = prompts["one_image"]
    img = p.images[0]
    d = Driver(runner)
    d.step([p.new_seq("x")], [("x", len(p.ids), True)])
    hit = d.slots_of["x"][: img.offset + img.num_tokens // 2]
    encoded = runner.images_encoded
    res = d.step([p.new_seq("y", hit)], [("y", len(p.ids) - len(hit), True)])
    tokens = list(res.token_ids)
    for _ in range(N_NEW - 1):
        tokens += d.step([], [("y", 1, True)]).token_ids
    assert tokens == reference["one_image"]
    assert runner.images_encoded == encoded  # x's encoding was cached
    runner.step(StepPlan(0, [], [], ["x", "y"]))


def test_embedding_cache_counts(model_path: Path, prompts: dict[str, Prompt]) -> None:
    runner = make_runner(model_path)  # a fresh embedding cache
    d = Driver(runner)
    one, turn2 = prompts["one_image"], prompts["second_turn"]  # images A and B
    first = d.step([one.new_seq("a")], [("a", len(one.ids), True)])
    assert first.images_encoded == 1
    # The cache holds the image's float32 embeddings: its tokens x the decoder's width x 4.
    width = runner.model.config.hidden_size
    assert first.image_cache_bytes == one.images[0].num_tokens * width * 4 == runner.mm_cache.used
    # The same image in another request (not a prefix hit): cached, not encoded again.
    shifted = [msgspec.structs.replace(i, offset=i.offset + 2) for i in one.images]
    again = NewSequence("b", [7, 8, *one.ids], len(one.ids) + 2, GREEDY, [], shifted)
    assert d.step([again], [("b", len(again.input_ids), True)]).images_encoded == 0
    # A different image: one more encoder run.
    assert d.step([turn2.new_seq("c")], [("c", len(turn2.ids), True)]).images_encoded == 1
    assert runner.images_encoded == 2


def test_both_checkpoint_layouts_and_flat_config(
    runner: ModelRunner, model_path: Path, prompts: dict[str, Prompt], tmp_path: Path
) -> None:
    """transformers v5 names (model.language_model.*, model.visual.*) with an older flat
    config (rope_scaling type mrope, text fields at the top, `in_chans`) load to the same
    model; a missing tensor is an error."""
    out = tmp_path / "v5"
    shutil.copytree(model_path, out)
    cfg = json.loads((model_path / "config.json").read_text())
    flat = {k: v for k, v in cfg.items() if k != "text_config"}
    text = dict(cfg["text_config"])
    rope = text.pop("rope_parameters")
    flat.update({k: v for k, v in text.items() if k != "model_type"})
    flat["rope_theta"] = rope["rope_theta"]
    flat["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    vision = dict(flat["vision_config"])
    vision["in_chans"] = vision.pop("in_channels")
    vision.pop("rope_parameters")
    flat["vision_config"] = vision
    (out / "config.json").write_text(json.dumps(flat))
    weights = load_file(str(model_path / "model.safetensors"))
    renamed = {
        ("model.language_model." + k[6:] if k.startswith("model.") else "model." + k): v
        for k, v in weights.items()
        if k != "lm_head.weight"
    }
    renamed["lm_head.weight"] = weights["lm_head.weight"]
    assert any(k.startswith("model.visual.blocks.") for k in renamed)
    save_file(renamed, str(out / "model.safetensors"))
    for path in (model_path, out):
        info = read_model_info(str(path))
        assert (info.context_length, info.vocab_size, info.eos_token_ids) == (1024, 512, [2])
        assert info.architecture == cfg["architectures"][0]
    p = prompts["two_images"]
    assert torch.equal(prefill_logits(make_runner(out), p), prefill_logits(runner, p))

    del renamed["model.visual.blocks.1.attn.qkv.bias"]
    save_file(renamed, str(out / "model.safetensors"))
    with pytest.raises(WeightLoadError, match=r"visual\.blocks\.1\.attn\.qkv\.bias"):
        make_runner(out)


def test_still_images_normalize_inside_the_patch_embedding(
    runner: ModelRunner, model_path: Path
) -> None:
    """The processor's raw uint8 frame through PatchEmbed.still equals transformers' normalized,
    T-times repeated patches through the Conv3d-as-Linear, up to float32 rounding."""
    config = json.loads((model_path / "config.json").read_text())
    processor = load_processor(str(model_path), config)
    assert processor is not None
    got = processor.preprocess(IMAGES["B"])
    assert got.pixel_values.shape == (12 * 18, 3 * 14 * 14)
    embed = runner.model.visual.patch_embed  # type: ignore[union-attr]
    with torch.inference_mode():
        still = embed.still(torch.from_numpy(got.pixel_values), got.pixel_scale, got.pixel_shift)
        full = embed(torch.from_numpy(processor.normalized(got)))  # type: ignore[attr-defined]
    assert still.shape == full.shape == (12 * 18, 64)
    top = full.abs().max().item()
    assert top > 0.1
    # Sums of 1,176 float32 products in another order: within 1e-5 of the largest value.
    assert (still - full).abs().max().item() < 1e-5 * top
