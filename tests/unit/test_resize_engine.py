"""The image resize engines (--image-resize): "torch" is torchvision's uint8 antialiased resize
bit for bit (the hashes below were computed with torchvision 0.28.0's
`transforms.v2.functional.resize(..., antialias=True)` on the same pixels, as transformers'
torchvision backend calls it); "pil" is PIL's resize bit for bit."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from fovea.tokenizer_service.processors import load_processor
from fovea.tokenizer_service.processors.base import resize_uint8

R = PIL.Image.Resampling
TORCHVISION_SHA256 = {
    ((756, 1036), R.BICUBIC): "31b344b952aafe7277d4e96cbf86975174875f638acb007270cdd41c8623f8ee",
    ((756, 1036), R.BILINEAR): "35535cf5d9a3e3ed4594507326d83eec95c9c08d05ac0ffa49f82ddaba12d07f",
    ((448, 448), R.BICUBIC): "b820907a55a03504a805502248608d2253b0b99f08c8e8cb88936bf537d54186",
    ((448, 448), R.BILINEAR): "2d676117ab9f7a019d4fec016da10b359ff513dc741c580cc6c51384222e7c47",
}


@pytest.fixture(scope="module")
def image() -> PIL.Image.Image:
    pixels = np.random.default_rng(26).integers(0, 256, (768, 1024, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


@pytest.mark.parametrize(("size", "resample"), list(TORCHVISION_SHA256))
def test_torch_engine_is_torchvisions_resize(
    image: PIL.Image.Image, size: tuple[int, int], resample: R
) -> None:
    (h, w) = size
    out = resize_uint8(image, w, h, resample, "torch")
    assert out.shape == (h, w, 3) and out.dtype == np.uint8
    digest = hashlib.sha256(np.ascontiguousarray(out).tobytes()).hexdigest()
    assert digest == TORCHVISION_SHA256[size, resample]


@pytest.mark.parametrize("resample", [R.BICUBIC, R.NEAREST, R.LANCZOS])
def test_pil_engine_and_filters_torch_lacks_are_pils_resize(
    image: PIL.Image.Image, resample: R
) -> None:
    want = np.asarray(image.resize((1036, 756), resample=resample))
    assert np.array_equal(resize_uint8(image, 1036, 756, resample, "pil"), want)
    if resample != R.BICUBIC:  # torch has no such filter: PIL's, whatever the engine
        assert np.array_equal(resize_uint8(image, 1036, 756, resample, "torch"), want)


def test_the_qwen2_vl_processor_resizes_with_the_engine_it_is_given(
    tmp_path: Path, image: PIL.Image.Image
) -> None:
    config = {"architectures": ["Qwen2VLForConditionalGeneration"], "image_token_id": 7}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"max_pixels": 1036 * 756}))
    pil = load_processor(str(tmp_path), config)
    torch = load_processor(str(tmp_path), config, "torch")
    assert pil is not None and torch is not None
    assert (pil.resize_engine, torch.resize_engine) == ("pil", "torch")
    a, b = pil.preprocess(image), torch.preprocess(image)
    assert a.grid == b.grid == [1, 54, 74] and a.num_tokens == b.num_tokens == 999
    assert not np.array_equal(a.pixel_values, b.pixel_values)
    # The torch engine's pixels are the torchvision-resized image, laid out as the PIL ones.
    resized = resize_uint8(image, 1036, 756, R.BICUBIC, "torch")
    assert np.array_equal(b.pixel_values, pil.preprocess(PIL.Image.fromarray(resized)).pixel_values)
