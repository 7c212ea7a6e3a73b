"""MiniCPM-V in both served layouts against their references on tiny checkpoints: 2.6 (the
hub's remote-code layout; reference: SiglipVisionModel + Qwen2ForCausalLM + the published
resampler, slicing and prompt code written plainly in tests/fixtures/minicpmv_reference.py) and
the native 4.6 (reference: transformers' MiniCPMV4_6ForConditionalGeneration and processor).

Asserted: the processor's views (pixel values bit for bit, patch grids, slice grid) and
expanded prompt ids equal the reference processor's for several image sizes, sliced ones
included; each view's placeholder run sits after its marker; each view's embeddings within
1e-4 of the reference's; greedy 32 tokens identical and prefill fp32 logits within 1e-3 for
text only, one image, two images; the views' cache keys; launch-time refusals of what is not
served."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from minicpmv_reference import MiniCPMV26Reference, MiniCPMV46Reference
from PIL import Image
from tiny_minicpmv import TOKEN_IDS
from worker_driver import GREEDY, greedy, make_runner, prefill_logits

from fovea.common.messages import ChatMessage, ImageInput, NewSequence
from fovea.common.model_config import ModelConfigError, read_model_info
from fovea.tokenizer_service.chat_templates import ChatRenderer
from fovea.tokenizer_service.processors import load_processor
from fovea.tokenizer_service.processors.minicpmv import SlicedImageProcessor
from fovea.tokenizer_service.tokenizer import image_inputs
from fovea.worker.model_runner import ModelRunner

LAYOUTS = ["2.6", "4.6"]
IMAGE_START, SLICE_START = TOKEN_IDS["<image>"], TOKEN_IDS["<slice>"]


def _image(seed: int, width: int, height: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


# Per layout: an image that slices 1 x 2 and one that is not sliced (2.6 views are at most
# 112² pixels, 4.6's 224²). 2.6's small one is 25 patches tall: a height whose fractional
# row coordinates fall into other position buckets when computed as transformers does.
IMAGES = {
    "2.6": {"wide": _image(1, 240, 120), "small": _image(2, 20, 200)},
    "4.6": {"wide": _image(1, 480, 240), "small": _image(2, 100, 80)},
}
IMAGE_PART = {"type": "image_url", "image_url": {"url": "unused"}}
CASES: dict[str, tuple[list[dict[str, Any]], list[str]]] = {
    "text": ([{"role": "user", "content": "Paris is the capital of France. 12345?"}], []),
    "one_image": (
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [IMAGE_PART, {"type": "text", "text": "Describe it."}]},
        ],
        ["wide"],
    ),
    "two_images": (
        [
            {
                "role": "user",
                "content": [IMAGE_PART, IMAGE_PART, {"type": "text", "text": "Compare"}],
            }
        ],
        ["wide", "small"],
    ),
}


@pytest.fixture(scope="module", autouse=True)
def _threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def paths(tiny_minicpmv: Path, tiny_minicpmv4_6: Path) -> dict[str, Path]:
    return {"2.6": tiny_minicpmv, "4.6": tiny_minicpmv4_6}


@pytest.fixture(scope="module")
def refs(paths: dict[str, Path]) -> dict[str, Any]:
    return {"2.6": MiniCPMV26Reference(paths["2.6"]), "4.6": MiniCPMV46Reference(paths["4.6"])}


@pytest.fixture(scope="module")
def runners(paths: dict[str, Path]) -> dict[str, ModelRunner]:
    return {layout: make_runner(path) for layout, path in paths.items()}


class Prompt:
    """Fovea's tokenizer-service steps for one conversation: the chat template (2.6: the
    built-in minicpmv; 4.6: the checkpoint's own, as a file), encode, preprocess, expand."""

    def __init__(self, path: Path, layout: str, messages: list[dict[str, Any]], images: list[Any]):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        spec = "minicpmv" if layout == "2.6" else str(path / "chat_template.jinja")
        chat = [ChatMessage(m["role"], m["content"]) for m in messages]
        text = ChatRenderer(tok, spec, model_takes_images=True).render(chat)
        self.images: list[Image.Image] = images
        processor = load_processor(str(path), json.loads((path / "config.json").read_text()))
        assert isinstance(processor, SlicedImageProcessor)
        self.processed = [processor.preprocess(im) for im in self.images]
        ids = tok.encode(text, add_special_tokens=False)
        self.ids, self.offsets = processor.expand_placeholders(ids, self.processed)
        hashes = [hashlib.blake2b(im.tobytes(), digest_size=32).digest() for im in self.images]
        self.inputs: list[ImageInput] = image_inputs(hashes, self.processed, self.offsets)

    def new_seq(self, key: str) -> NewSequence:
        return NewSequence(key, self.ids, len(self.ids), GREEDY, [], self.inputs)


@pytest.fixture(scope="module")
def prompts(paths: dict[str, Path]) -> dict[tuple[str, str], Prompt]:
    return {
        (layout, case): Prompt(paths[layout], layout, *case_inputs(layout, case))
        for layout in LAYOUTS
        for case in CASES
    }


def case_inputs(layout: str, case: str) -> tuple[list[dict[str, Any]], list[Image.Image]]:
    messages, names = CASES[case]
    return messages, [IMAGES[layout][n] for n in names]




# ---------------------------------------------------------------- processor


# (layout, width, height) -> the views' patch grids [h, w] and the [rows, cols] slice grid
VIEWS = {
    ("2.6", 64, 48): ([[7, 9]], [0, 0]),
    ("2.6", 20, 200): ([[25, 2]], [0, 0]),
    ("2.6", 240, 120): ([[6, 11], [8, 8], [8, 8]], [1, 2]),
    ("2.6", 120, 300): ([[13, 5], [7, 9], [7, 9], [7, 9]], [3, 1]),
    ("2.6", 1000, 30): ([[1, 45], [3, 23], [3, 23], [3, 23], [3, 23]], [1, 4]),
    ("4.6", 100, 80): ([[16, 16]], [0, 0]),
    ("4.6", 480, 240): ([[12, 24], [16, 16], [16, 16]], [1, 2]),
    ("4.6", 300, 500): ([[20, 12], [16, 16], [16, 16]], [2, 1]),
    ("4.6", 700, 90): ([[4, 44], [8, 24], [8, 24], [8, 24]], [1, 3]),
}


def _ref_views(ref: Any, layout: str, image: Image.Image) -> tuple[list[np.ndarray], list[Any]]:
    """The reference processor's per-view pixel values and patch grids."""
    if layout == "2.6":
        return ref.proc.preprocess(image)  # type: ignore[no-any-return]
    out = ref.proc.image_processor(images=[image], return_tensors="np")
    sizes = out["target_sizes"].tolist()
    widths = np.cumsum([0] + [h * w * 14 for h, w in sizes])
    pixels = out["pixel_values"][0]
    return [pixels[:, :, a:b] for a, b in itertools.pairwise(widths)], sizes


@pytest.mark.parametrize(("layout", "width", "height"), list(VIEWS))
def test_views_match_the_reference_processor(
    paths: dict[str, Path], refs: dict[str, Any], layout: str, width: int, height: int
) -> None:
    image = _image(width + height, width, height)
    path = paths[layout]
    processor = load_processor(str(path), json.loads((path / "config.json").read_text()))
    assert processor is not None
    ours = processor.preprocess(image)
    grids, slices = VIEWS[(layout, width, height)]
    assert [p.grid for p in ours.parts] == grids and ours.grid == slices
    pixels, sizes = _ref_views(refs[layout], layout, image)
    assert sizes == grids
    for part, ref_pixels in zip(ours.parts, pixels, strict=True):
        assert part.pixel_values.dtype == np.float32 and part.pixel_values.flags.c_contiguous
        assert np.array_equal(part.pixel_values, ref_pixels)
    tokens = [16] * len(grids) if layout == "2.6" else [h * w // 16 for h, w in grids]
    assert [p.num_tokens for p in ours.parts] == tokens and ours.num_tokens == sum(tokens)
    # The expanded one-image prompt equals the reference processor's ids.
    messages = [{"role": "user", "content": [IMAGE_PART, {"type": "text", "text": "What?"}]}]
    assert Prompt(path, layout, messages, [image]).ids == refs[layout].prompt(messages, [image])[0]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", list(CASES))
def test_prompt_ids_and_runs(
    prompts: dict[tuple[str, str], Prompt], refs: dict[str, Any], layout: str, case: str
) -> None:
    p = prompts[(layout, case)]
    assert p.ids == refs[layout].prompt(*case_inputs(layout, case))[0]
    pad = TOKEN_IDS["<unk>" if layout == "2.6" else "<|image_pad|>"]
    runs = [(img.offset, img.num_tokens) for img in p.inputs]
    assert runs == [(o, part.num_tokens) for o, part in
                    zip(p.offsets, [q for im in p.processed for q in im.parts], strict=True)]  # fmt: skip
    for offset, n in runs:
        assert p.ids[offset - 1] in (IMAGE_START, SLICE_START)
        assert p.ids[offset : offset + n] == [pad] * n and p.ids[offset + n] != pad
    assert p.ids.count(pad) == sum(n for _, n in runs)
    # The first run of each image is its global view, preceded by <image_id>k</image_id><image>.
    firsts = [o for o in p.offsets if p.ids[o - 1] == IMAGE_START]
    assert len(firsts) == len(p.images)
    assert [p.ids[o - 2] for o in firsts] == [TOKEN_IDS["</image_id>"]] * len(p.images)


def test_views_are_keyed_by_image_and_index(prompts: dict[tuple[str, str], Prompt]) -> None:
    two = prompts[("4.6", "two_images")].inputs
    one = prompts[("4.6", "one_image")].inputs
    assert len(two) == 4 and len(one) == 3  # wide: global + 2 slices; small: global only
    assert len({img.hash for img in two}) == 4  # every view its own cache key
    assert [img.hash for img in two[:3]] == [img.hash for img in one]  # same image, same keys
    assert [tuple(img.grid) for img in two] == [(12, 24), (16, 16), (16, 16), (16, 16)]


# ---------------------------------------------------------------- model


def _ref_features(ref: Any, layout: str, images: list[Image.Image]) -> list[torch.Tensor]:
    """The reference's features of every view, in prompt order."""
    messages = CASES["two_images"][0]
    with torch.no_grad():
        if layout == "2.6":
            _, pixels, sizes = ref.prompt(messages, images)
            return list(ref.vision(pixels, sizes))
        _, kw = ref.prompt(messages, images)
        out = ref.model.model.get_image_features(kw["pixel_values"], kw["target_sizes"])
        return list(out.pooler_output)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_image_features_match_the_reference(
    prompts: dict[tuple[str, str], Prompt],
    refs: dict[str, Any],
    runners: dict[str, ModelRunner],
    layout: str,
) -> None:
    """Each view's embeddings, before the decoder dilutes differences: within 1e-4."""
    p = prompts[(layout, "two_images")]
    with torch.no_grad():
        ours = runners[layout].model.encode_images(p.inputs)
    expected = _ref_features(refs[layout], layout, p.images)
    assert [tuple(t.shape) for t in ours] == [tuple(t.shape) for t in expected]
    assert [t.shape[0] for t in ours] == [img.num_tokens for img in p.inputs]
    for a, b in zip(ours, expected, strict=True):
        assert torch.allclose(a, b, atol=1e-4, rtol=0), (a - b).abs().max()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", list(CASES))
def test_greedy_matches_the_reference(
    prompts: dict[tuple[str, str], Prompt],
    refs: dict[str, Any],
    runners: dict[str, ModelRunner],
    layout: str,
    case: str,
) -> None:
    expected = refs[layout].greedy(*case_inputs(layout, case))
    assert greedy(runners[layout], prompts[(layout, case)]) == expected


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", list(CASES))
def test_prefill_logits_match_the_reference(
    prompts: dict[tuple[str, str], Prompt],
    refs: dict[str, Any],
    runners: dict[str, ModelRunner],
    layout: str,
    case: str,
) -> None:
    messages, images = case_inputs(layout, case)
    expected = refs[layout].logits(messages, images)
    ours = prefill_logits(runners[layout], prompts[(layout, case)])
    assert ours.shape == expected.shape
    assert torch.allclose(ours, expected, atol=1e-3, rtol=0), (ours - expected).abs().max()
    if images:  # the images matter: without them the logits move well beyond the tolerance
        blank = refs[layout].logits(messages, [Image.new("RGB", im.size) for im in images])
        assert (blank - expected).abs().max() > 0.05


# ---------------------------------------------------------------- what is refused


def _edited(src: Path, dst: Path, **changes: Any) -> Path:
    dst.mkdir()
    for f in ("tokenizer.json", "preprocessor_config.json"):
        (dst / f).write_bytes((src / f).read_bytes())
    cfg = json.loads((src / "config.json").read_text()) | changes
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_unservable_checkpoints_are_refused_at_launch(
    paths: dict[str, Path], tmp_path: Path
) -> None:
    qwen35 = {"model_type": "qwen3_5_text", "hidden_size": 64}
    cases = {
        "qwen35": (
            paths["4.6"], {"text_config": qwen35},
            "MiniCPM-V 4.6 with a 'qwen3_5_text' language model is not supported (Qwen3.5's "
            "linear-attention layers keep recurrent state Fovea's paged KV cache does not "
            "hold); supported text_config model types: llama, mistral, qwen2",
        ),
        "v25": (
            paths["2.6"], {"version": 2.5},
            "MiniCPM-V version 2.5 is not supported; Fovea serves the MiniCPMV layout of "
            "version 2.6",
        ),
        "queries": (
            paths["2.6"], {"query_num": 64},
            "preprocessor_config.json image_feature_size 16 differs from config.json "
            "query_num 64",
        ),
    }  # fmt: skip
    for name, (src, changes, message) in cases.items():
        model = _edited(src, tmp_path / name, **changes)
        with pytest.raises(ModelConfigError) as e:
            read_model_info(str(model))
        assert str(e.value) == f"{model}/config.json: {message}"
    for path in paths.values():
        assert read_model_info(str(path)).architecture in (
            "MiniCPMV",
            "MiniCPMV4_6ForConditionalGeneration",
        )
