"""Image processors against transformers' PIL-backend processors: same grid exactly, same
pixel_values within 1e-6 (shape, dtype float32), on random images of assorted sizes. Qwen2-VL
sends raw uint8 patches with an affine map instead: `normalized` must give transformers' array
and the affine map (what the tower folds into its patch embedding) must agree with it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from vision_helpers import still_as_transformers

from fovea.tokenizer_service.processors import ImageProcessor, ProcessedImage, load_processor
from fovea.tokenizer_service.processors.qwen2_vl import Qwen2VLProcessor

QWEN2_VL = {"architectures": ["Qwen2VLForConditionalGeneration"], "image_token_id": 7}
SMALL = {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 64}


def random_image(width: int, height: int, seed: int, mode: str = "RGB") -> PIL.Image.Image:
    shape = (height, width) if mode == "L" else (height, width, len(mode))
    pixels = np.random.default_rng(seed).integers(0, 256, shape, np.uint8)
    return PIL.Image.fromarray(pixels, mode)


def load(model_dir: Path, hf_config: dict[str, Any] = QWEN2_VL) -> ImageProcessor:
    processor = load_processor(str(model_dir), hf_config)
    assert processor is not None
    return processor


def assert_matches(
    hf: Qwen2VLImageProcessorPil, ours: ImageProcessor, image: PIL.Image.Image
) -> ProcessedImage:
    expected = hf(image, return_tensors="np")
    got = ours.preprocess(image)
    grid = expected["image_grid_thw"][0].tolist()
    assert got.grid == grid
    assert got.num_tokens == grid[0] * grid[1] * grid[2] // hf.merge_size**2
    want = expected["pixel_values"]
    assert isinstance(ours, Qwen2VLProcessor)
    assert got.pixel_values.dtype == np.uint8
    assert got.pixel_values.flags.c_contiguous
    T = ours.temporal_patch_size
    assert got.pixel_values.shape == (want.shape[0], want.shape[1] // T)
    assert np.abs(ours.normalized(got) - want).max() <= 1e-6
    # The affine map, applied to one frame and repeated, is transformers' arithmetic up to
    # float rounding (|values| <= ~2.6 here).
    affine = still_as_transformers(got.pixel_values, got.pixel_scale, got.pixel_shift, T)
    assert np.abs(affine - want).max() <= 2e-6
    return got


@pytest.fixture
def small(tmp_path: Path) -> tuple[Qwen2VLImageProcessorPil, ImageProcessor]:
    hf = Qwen2VLImageProcessorPil(**SMALL)
    hf.save_pretrained(tmp_path)
    return hf, load(tmp_path)


@pytest.mark.parametrize(
    ("width", "height", "grid"),
    [
        (20, 30, [1, 6, 4]),  # grows to min_pixels
        (1, 1, [1, 4, 4]),
        (33, 997, [1, 72, 2]),
        (1500, 700, [1, 10, 22]),  # shrinks to max_pixels
        (700, 1500, [1, 22, 10]),
        (224, 224, [1, 16, 16]),
        (1000, 5, [1, 2, 58]),
        (1024, 1024, [1, 16, 16]),
    ],
)
def test_qwen2_vl_matches_transformers(
    small: tuple[Qwen2VLImageProcessorPil, ImageProcessor], width: int, height: int, grid: list[int]
) -> None:
    hf, ours = small
    assert isinstance(ours, Qwen2VLProcessor)
    assert ours.image_token_id == 7
    got = assert_matches(hf, ours, random_image(width, height, seed=width * 7919 + height))
    assert got.grid == grid
    assert got.num_tokens == grid[1] * grid[2] // 4


def test_qwen2_vl_bit_identical(small: tuple[Qwen2VLImageProcessorPil, ImageProcessor]) -> None:
    # The value table reproduces transformers' dtype steps, so there is no rounding slack at all.
    hf, ours = small
    image = random_image(300, 200, seed=3)
    assert isinstance(ours, Qwen2VLProcessor)
    normalized = ours.normalized(ours.preprocess(image))
    assert np.array_equal(normalized, hf(image)["pixel_values"])


@pytest.mark.parametrize("mode", ["RGBA", "L", "LA"])
def test_qwen2_vl_converts_like_transformers(
    small: tuple[Qwen2VLImageProcessorPil, ImageProcessor], mode: str
) -> None:
    # Transparency is composited onto white; grayscale becomes RGB.
    hf, ours = small
    assert_matches(hf, ours, random_image(90, 60, seed=11, mode=mode))


def test_qwen2_vl_defaults_1024(tmp_path: Path) -> None:
    hf = Qwen2VLImageProcessorPil()
    hf.save_pretrained(tmp_path)
    got = assert_matches(hf, load(tmp_path), random_image(1024, 1024, seed=5))
    assert got.grid == [1, 70, 70]
    assert got.num_tokens == 1225
    assert got.pixel_values.shape == (4900, 588)  # one frame of C*P*P, not T of them


def test_qwen2_vl_other_settings(tmp_path: Path) -> None:
    # Every preprocessor_config key is read: none of these is the default.
    hf = Qwen2VLImageProcessorPil(
        min_pixels=48 * 48,
        max_pixels=48 * 48 * 9,
        patch_size=8,
        merge_size=3,
        temporal_patch_size=3,
        image_mean=[0.5, 0.4, 0.3],
        image_std=[0.2, 0.3, 0.4],
        rescale_factor=1 / 127.5,
        resample=PIL.Image.Resampling.BILINEAR,
    )
    hf.save_pretrained(tmp_path)
    ours = load(tmp_path)
    got = assert_matches(hf, ours, random_image(250, 130, seed=9))
    assert got.grid == [1, 12, 24]
    assert got.num_tokens == 32
    assert got.pixel_values.shape == (288, 3 * 8 * 8)
    assert_matches(hf, ours, random_image(10, 10, seed=10))


def test_qwen2_vl_no_rescale_no_normalize(tmp_path: Path) -> None:
    hf = Qwen2VLImageProcessorPil(**SMALL, do_rescale=False, do_normalize=False)
    hf.save_pretrained(tmp_path)
    got = assert_matches(hf, load(tmp_path), random_image(64, 80, seed=4))
    assert got.pixel_scale == (1.0, 1.0, 1.0)  # the raw 0..255 values as they are
    assert got.pixel_shift == (0.0, 0.0, 0.0)


def test_qwen2_vl_old_key_style(tmp_path: Path) -> None:
    # Published Qwen2-VL checkpoints: top-level min_pixels / max_pixels, no `size`.
    config = {
        "min_pixels": 28 * 28 * 8,
        "max_pixels": 28 * 28 * 20,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor",
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    hf = Qwen2VLImageProcessorPil.from_pretrained(tmp_path)
    ours = load(tmp_path)
    assert assert_matches(hf, ours, random_image(20, 30, seed=1)).grid == [1, 8, 6]  # min_pixels
    assert assert_matches(hf, ours, random_image(800, 600, seed=2)).grid == [1, 6, 10]  # max_pixels


def test_qwen2_vl_aspect_ratio_limit(
    small: tuple[Qwen2VLImageProcessorPil, ImageProcessor],
) -> None:
    hf, ours = small
    image = PIL.Image.new("RGB", (201, 1))
    with pytest.raises(ValueError, match="aspect ratio"):
        hf(image)
    with pytest.raises(ValueError, match=r"^image aspect ratio must be at most 200:1, got 201.0:1"):
        ours.preprocess(image)
    assert ours.preprocess(PIL.Image.new("RGB", (200, 1))).grid == [1, 2, 58]


def test_registry(tmp_path: Path) -> None:
    Qwen2VLImageProcessorPil(**SMALL).save_pretrained(tmp_path)
    qwen25 = load(
        tmp_path,
        {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "text_config": {"image_token_id": 9},
        },
    )
    assert type(qwen25) is Qwen2VLProcessor
    assert qwen25.image_token_id == 9  # v5 configs keep it in text_config
    qwen2 = load(tmp_path, {"architectures": ["Qwen2VLForConditionalGeneration"]})
    assert qwen2.image_token_id == 151655
    assert load_processor(str(tmp_path), {"architectures": ["LlamaForCausalLM"]}) is None
    assert load_processor(str(tmp_path), {}) is None
    unknown_vlm = {"architectures": ["FooForConditionalGeneration"], "vision_config": {}}
    assert load_processor(str(tmp_path), unknown_vlm) is None


def processed(num_tokens: int) -> ProcessedImage:
    return ProcessedImage(np.zeros((num_tokens, 1), np.float32), [1, num_tokens, 1], num_tokens)


def test_expand_placeholders() -> None:
    ours = Qwen2VLProcessor(image_token_id=7)
    ids = [1, 2, 7, 3, 7, 4]
    assert ours.expand_placeholders(ids, [processed(3), processed(2)]) == (
        [1, 2, 7, 7, 7, 3, 7, 7, 4],
        [2, 6],
    )
    assert ours.expand_placeholders([7, 7], [processed(1), processed(2)]) == ([7, 7, 7], [0, 1])
    assert ours.expand_placeholders([5, 6], []) == ([5, 6], [])
    with pytest.raises(ValueError) as e:
        ours.expand_placeholders(ids, [processed(3)])
    assert str(e.value) == "the prompt has 2 image placeholders but 1 images were given"
