"""DeepSeek-VL2 image preprocessing and placeholder counts, equal to DeepSeek-VL2's
`DeepseekVLV2Processor.tokenize_with_images`:
- the tile grid: `select_best_resolution` over candidate_resolutions ((width, height)) keeps
  the most effective pixels, then the least waste — only when the request has at most two
  images; with more, every image is one tile (the reference's `cropping=len(images) <= 2`);
- the global view: the image fitted into S x S (aspect kept, bicubic) and padded with the
  mean colour (PIL's ImageOps.pad, as the reference);
- the local tiles: the image fitted and padded the same way into the chosen resolution, cut
  into S x S tiles row-major;
- each view to float32 as torchvision's ToTensor + Normalize do (v / 255, then (x - mean) /
  std, each step in float32) — one lookup table per channel, bit-identical.
pixel_values [1 + tiles, 3, S, S]; grid [width tiles, height tiles]; placeholders
h * (w + 1) + 1 + (th * h) * (tw * w + 1) for h = w tokens per tile side.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import PIL.Image
from PIL import ImageOps

from fovea.common.families.deepseek_vl2 import (
    DeepseekVL2Spec,
    ProcessorSettings,
    deepseek_vl2_spec,
    processor_settings,
)
from fovea.tokenizer_service.processors.base import ImageProcessor, ProcessedImage, rgb_input

ONE_TILE = b"deepseek-vl2:one-tile"  # ProcessedImage.variant when a request has > 2 images
MAX_CROPPING_IMAGES = 2


def select_best_resolution(
    width: int, height: int, candidates: tuple[tuple[int, int], ...]
) -> tuple[int, int]:
    """The (width, height) candidate keeping the most of the image's pixels once it is fitted
    inside (ties: the one wasting the fewest), as DeepSeek-VL2's processor picks it. An image
    so thin that no candidate keeps a pixel gets the first (where the reference fails)."""
    best, best_effective, best_waste = candidates[0], 0, float("inf")
    for cw, ch in candidates:
        scale = min(cw / width, ch / height)
        fitted_w, fitted_h = int(width * scale), int(height * scale)
        effective = min(fitted_w * fitted_h, width * height)
        waste = cw * ch - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (cw, ch), effective, waste
    return best


def normalize_table(mean: tuple[float, ...], std: tuple[float, ...], normalize: bool) -> np.ndarray:
    """[3, 256] float32: torchvision's ToTensor (float32 v / 255) then Normalize (float32
    (x - mean) / std) of each uint8 value per channel."""
    x = np.arange(256, dtype=np.float32) / np.float32(255)
    rows = []
    for m, s in zip(mean, std, strict=True):
        rows.append((x - np.float32(m)) / np.float32(s) if normalize else x)
    return np.stack(rows).astype(np.float32)


class DeepseekVL2Processor(ImageProcessor):
    def __init__(self, spec: DeepseekVL2Spec, settings: ProcessorSettings) -> None:
        self.spec = spec
        self.image_token_id = settings.image_token_id
        self.candidates = settings.candidate_resolutions
        self.tile = settings.candidate_resolutions[0][0]  # == spec.image_size (checked)
        self.background = tuple(int(m * 255) for m in settings.image_mean)  # the pad colour
        self._table = normalize_table(settings.image_mean, settings.image_std, settings.normalize)

    @classmethod
    def from_pretrained(cls, model_dir: str, hf_config: dict[str, Any]) -> DeepseekVL2Processor:
        """From config.json and model_dir/processor_config.json (when present)."""
        spec = deepseek_vl2_spec(hf_config)
        return cls(spec, processor_settings(model_dir, spec))

    def preprocess(self, image: PIL.Image.Image) -> ProcessedImage:
        return self.preprocess_in_request(image, 1)

    def preprocess_in_request(self, image: PIL.Image.Image, num_images: int) -> ProcessedImage:
        image = rgb_input(image, True)
        s = self.tile
        cropping = num_images <= MAX_CROPPING_IMAGES
        best_w, best_h = (
            select_best_resolution(image.width, image.height, self.candidates)
            if cropping
            else (s, s)
        )
        views = [ImageOps.pad(image, (s, s), color=self.background)]
        local = ImageOps.pad(image, (best_w, best_h), color=self.background)
        views += [
            local.crop((x, y, x + s, y + s))
            for y in range(0, best_h, s)
            for x in range(0, best_w, s)
        ]
        out = np.empty((len(views), 3, s, s), dtype=np.float32)
        for i, view in enumerate(views):
            pixels = np.asarray(view)  # [S, S, 3] uint8
            for c in range(3):
                # uint8 indices are always in range: mode="clip" only skips the bounds check.
                np.take(self._table[c], pixels[:, :, c], out=out[i, c], mode="clip")
        tiles_w, tiles_h = best_w // s, best_h // s
        return ProcessedImage(
            pixel_values=out,
            grid=[tiles_w, tiles_h],
            num_tokens=self.spec.image_tokens(tiles_w, tiles_h),
            variant=b"" if cropping else ONE_TILE,
        )
