"""LLaVA-1.5, LLaVA-NeXT, Llama3-LLaVA-NeXT and LLaVA-OneVision against transformers on tiny
checkpoints, through the worker: the prompt and pixels Fovea's processor makes equal
transformers' processor's, greedy tokens identical and prefill logits close for text, one
image, two images and a second turn; the anyres paths are really taken; the original
checkpoint layout loads to the same model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from llava_helpers import LlavaReference, random_image
from PIL import Image
from safetensors.torch import load_file, save_file
from tiny_models import make_original_llava
from worker_driver import GREEDY, Driver, greedy, make_runner, prefill_logits

from fovea.common.families.llava import anyres_feature_shape, llava_spec, unpadded_shape
from fovea.common.messages import ImageInput, NewSequence, ScheduledChunk, StepPlan
from fovea.common.model_config import read_model_info
from fovea.tokenizer_service.processors import load_processor
from fovea.tokenizer_service.processors.llava import BASE_ONLY, LlavaProcessor
from fovea.tokenizer_service.tokenizer import image_hash
from fovea.worker.loader import WeightLoadError
from fovea.worker.model_runner import ModelRunner

KINDS = ["llava", "llava_next", "llama3_llava_next", "llava_onevision"]
# A (100x150) is unpadded by NeXT and downscaled by OneVision's anyres_max; D is A's size.
IMAGES = {
    "A": random_image(1, 100, 150),
    "B": random_image(2, 64, 48),
    "C": random_image(3, 120, 90),
    "D": random_image(4, 100, 150),
}

Part = str | tuple[str, str]  # text, or ("image", name)
CASES: dict[str, list[tuple[str, list[Part]]]] = {
    "text": [("user", ["Paris is the capital of France. Numbers like 12345?"])],
    "one_image": [("user", [("image", "A"), "Describe the image."])],
    "two_images": [("user", ["Compare", ("image", "A"), "with", ("image", "B"), "please."])],
    "second_turn": [
        ("user", [("image", "C"), "What is this?"]),
        ("assistant", ["The quick brown fox."]),
        ("user", ["And the dog?"]),
    ],
}


@pytest.fixture(scope="module", params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    torch.set_num_threads(2)
    return str(request.param)


@pytest.fixture(scope="module")
def model_path(kind: str, request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(f"tiny_{kind}")  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def ref(model_path: Path, kind: str) -> LlavaReference:
    return LlavaReference(model_path, kind)


@pytest.fixture(scope="module")
def runner(model_path: Path) -> ModelRunner:
    return make_runner(model_path)


@pytest.fixture(scope="module")
def processor(model_path: Path) -> LlavaProcessor:
    proc = load_processor(str(model_path), json.loads((model_path / "config.json").read_text()))
    assert isinstance(proc, LlavaProcessor)
    return proc


class Prompt:
    """Fovea's prompt (ids, ImageInputs) and transformers' (ids, image tensors) for a case."""

    def __init__(
        self, ref: LlavaReference, proc: LlavaProcessor, turns: list[tuple[str, list[Part]]]
    ) -> None:
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
        names = [p[1] for _, parts in turns for p in parts if isinstance(p, tuple)]
        images: list[Image.Image] = [IMAGES[n] for n in names]
        self.hf_ids, self.hf_kwargs = ref.prompt(messages, images)
        ids = ref.tok.encode(ref.render(messages), add_special_tokens=False)
        processed = [proc.preprocess_in_request(im, len(images)) for im in images]
        self.ids, offsets = proc.expand_placeholders(ids, processed)
        self.images = []
        for im, p, off in zip(images, processed, offsets, strict=True):
            digest = hashlib.blake2b(im.tobytes(), digest_size=32).digest()
            img = ImageInput(image_hash(digest, p), off, p.num_tokens, p.pixel_values, p.grid)
            self.images.append(img)

    def new_seq(self, key: str) -> NewSequence:
        return NewSequence(key, self.ids, len(self.ids), GREEDY, [], self.images)


@pytest.fixture(scope="module")
def prompts(ref: LlavaReference, processor: LlavaProcessor) -> dict[str, Prompt]:
    return {name: Prompt(ref, processor, turns) for name, turns in CASES.items()}




@pytest.mark.parametrize("case", list(CASES))
def test_prompt_and_pixels_match_transformers_processor(
    prompts: dict[str, Prompt], ref: LlavaReference, case: str
) -> None:
    p = prompts[case]
    assert p.ids == p.hf_ids
    assert p.ids.count(ref.image_token) == sum(img.num_tokens for img in p.images)
    assert p.ids.count(ref.tok.bos_token_id) == (ref.tok.bos_token_id is not None)
    if p.images:
        hf_pixels = p.hf_kwargs["pixel_values"].numpy()
        for i, img in enumerate(p.images):
            theirs = hf_pixels[i] if hf_pixels.ndim == 5 else hf_pixels[i : i + 1]
            assert np.array_equal(img.pixel_values, theirs[: len(img.pixel_values)])


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_matches_transformers(
    runner: ModelRunner, prompts: dict[str, Prompt], ref: LlavaReference, case: str
) -> None:
    p = prompts[case]
    assert greedy(runner, p) == ref.greedy(p.hf_ids, p.hf_kwargs)
    assert runner.seqs == {}


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_logits_match_transformers(
    runner: ModelRunner, prompts: dict[str, Prompt], ref: LlavaReference, case: str
) -> None:
    p = prompts[case]
    ours = prefill_logits(runner, p)
    assert ours.shape == (len(p.ids), 512)
    assert (ours - ref.logits(p.hf_ids, p.hf_kwargs)).abs().max().item() < 1e-3


def test_the_image_matters(
    runner: ModelRunner, ref: LlavaReference, processor: LlavaProcessor
) -> None:
    """Another image of the same size changes the logits after it: the vision path is live."""
    a = Prompt(ref, processor, CASES["one_image"])
    b = Prompt(ref, processor, [("user", [("image", "D"), "Describe the image."])])
    assert a.ids == b.ids and a.images[0].hash != b.images[0].hash
    start = a.images[0].offset
    diff = (prefill_logits(runner, a) - prefill_logits(runner, b))[start:].abs().max().item()
    assert diff > 0.05


def test_the_family_paths_are_taken(model_path: Path, prompts: dict[str, Prompt]) -> None:
    """LLaVA-1.5: one tile. NeXT: image A's tiles are unpadded (rows cut). OneVision: A alone
    is downscaled (anyres_max_4); among two images each is one padded tile + a newline."""
    spec = llava_spec(json.loads((model_path / "config.json").read_text()))
    one, two = prompts["one_image"].images[0], prompts["two_images"].images
    height, width = 150, 100
    assert one.grid == [height, width]
    if not spec.anyres:
        assert one.pixel_values.shape == (1, 3, 56, 56) and one.num_tokens == 16
        return
    tiles_h, tiles_w, rows, cols = anyres_feature_shape(spec, height, width)
    assert one.pixel_values.shape == (1 + tiles_h * tiles_w, 3, 56, 56)
    assert one.num_tokens == 16 + rows * (cols + 1)
    unpadded = unpadded_shape(4 * tiles_h, 4 * tiles_w, height, width)
    if spec.multi_image_base_only:
        assert (tiles_h, tiles_w, unpadded, rows, cols) == (3, 2, (12, 8), 9, 6)
        assert [i.num_tokens for i in two] == [17, 17]
        assert [i.pixel_values.shape[0] for i in two] == [1, 1]
        alone = hashlib.blake2b(IMAGES["A"].tobytes(), digest_size=32).digest()
        assert one.hash == alone and two[0].hash == image_hash(alone, _base_only()) != alone
    else:
        assert (tiles_h, tiles_w, unpadded, rows, cols) == (2, 2, (8, 6), 8, 6)
        assert two[0].num_tokens == one.num_tokens and two[0].hash == one.hash


def _base_only() -> Any:
    from fovea.tokenizer_service.processors.base import ProcessedImage

    return ProcessedImage(np.zeros(1, np.float32), [], 0, BASE_ONLY)


def test_image_split_across_chunks(runner: ModelRunner, prompts: dict[str, Prompt]) -> None:
    p = prompts["two_images"]
    a, b = p.images
    whole = prefill_logits(runner, p)[-1]
    cuts = [a.offset + 5, b.offset + 7, len(p.ids)]  # inside image A, inside image B, end
    d = Driver(runner)
    d.step([p.new_seq("c")], [("c", cuts[0], False)])
    d.step([], [("c", cuts[1] - cuts[0], False)])
    plan = StepPlan(0, [], [ScheduledChunk("c", d.alloc("c", cuts[2] - cuts[1]), True)], [])
    last, _ = runner.forward(plan)
    runner.step(StepPlan(0, [], [], ["c"]))
    assert (last[0] - whole).abs().max().item() < 1e-4


def test_original_layout_is_the_same_model(
    model_path: Path,
    runner: ModelRunner,
    processor: LlavaProcessor,
    prompts: dict[str, Prompt],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The same weights written in the original layout (flat config naming a hub tower, no
    preprocessor_config.json, no image_token_index) give the same processor output and
    bit-identical logits; the tower layer the features do not reach is skipped."""
    out = make_original_llava(model_path, tmp_path_factory.mktemp("original"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"][0] in ("LlavaLlamaForCausalLM", "LlavaQwenForCausalLM")
    assert not (out / "preprocessor_config.json").exists() and "image_token_index" not in cfg
    info, theirs = read_model_info(str(out)), read_model_info(str(model_path))
    assert (info.context_length, info.vocab_size, info.eos_token_ids) == (
        theirs.context_length, theirs.vocab_size, theirs.eos_token_ids,
    )  # fmt: skip
    orig_proc = load_processor(str(out), cfg)
    assert isinstance(orig_proc, LlavaProcessor)
    assert orig_proc.image_token_id == processor.image_token_id
    for im in IMAGES.values():
        for n in (1, 2):
            mine, conv = (
                orig_proc.preprocess_in_request(im, n),
                processor.preprocess_in_request(im, n),
            )
            assert mine.num_tokens == conv.num_tokens and mine.variant == conv.variant
            assert np.array_equal(mine.pixel_values, conv.pixel_values)
    orig = make_runner(out)
    assert len(orig.model.vision_tower.encoder.layers) == len(
        runner.model.vision_tower.encoder.layers
    )
    for case in ("two_images", "second_turn"):
        p = prompts[case]
        assert torch.equal(prefill_logits(orig, p), prefill_logits(runner, p))


def test_unused_tower_layers_are_skipped_and_missing_weights_fail(
    model_path: Path, tmp_path: Path
) -> None:
    weights = load_file(str(model_path / "model.safetensors"))
    tower_layers = {k.split(".")[3] for k in weights if k.startswith("vision_tower.encoder.")}
    built = make_runner(model_path).model.vision_tower.encoder.layers
    clip = "clip_vision_model" in (model_path / "config.json").read_text()
    # CLIP: features from layer 2 of 3, so layer 2 is in the checkpoint but not built.
    assert (len(tower_layers), len(built)) == ((3, 2) if clip else (3, 3))
    for f in model_path.iterdir():
        if f.name != "model.safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    del weights["vision_tower.encoder.layers.1.self_attn.q_proj.weight"]
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightLoadError, match=r"vision_tower\.encoder\.layers\.1\.self_attn"):
        make_runner(tmp_path)
