"""Qwen2-VL / Qwen2.5-VL image preprocessing, equal to transformers' `Qwen2VLImageProcessorPil`.

The image is resized in uint8 PIL space to a size `smart_resize` picks (both sides multiples of
patch_size * merge_size, pixel count within [min_pixels, max_pixels]), then cut into
patch_size² patches ordered merge-block by merge-block. transformers then rescales, normalizes
and repeats each patch temporal_patch_size times (a still image is one frame of a video).

What is sent instead: the patches' raw uint8 values, one frame, with the per-channel affine map
of rescale + normalize (`pixel_scale`, `pixel_shift`). The tower folds both the map and the
repeat into its patch-embedding weight (worker/models/qwen2_vl.py, PatchEmbed.still), so
nothing widens to float32 here: 1/8 of the bytes (a 1024×768 image: 2.3 MB, not 18.8 MB) and
no normalize pass. `normalized` rebuilds transformers' float32 array bit for bit (a 3×256
lookup table computed once with their exact dtype steps), for tests and benchmarks.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np
import PIL.Image

from fovea.tokenizer_service.processors.base import (
    CHANNELS,
    ImageProcessor,
    PixelOptions,
    ProcessedImage,
    resize_uint8,
    rgb_input,
)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PIXELS = PixelOptions(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)  # bicubic
QWEN2_VL_IMAGE_TOKEN_ID = 151655  # <|image_pad|>
MAX_ASPECT_RATIO = 200


def smart_resize(
    height: int, width: int, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """(height, width), both multiples of factor, with height * width in [min_pixels,
    max_pixels] and the aspect ratio kept as closely as that allows. transformers' rounding,
    kept exactly: round() is round-half-even, shrinking floors and growing ceils."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"image aspect ratio must be at most {MAX_ASPECT_RATIO}:1, got "
            f"{max(height, width) / min(height, width):.1f}:1 ({width}x{height} pixels)"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


class Qwen2VLProcessor(ImageProcessor):
    """Qwen2-VL and Qwen2.5-VL (the same preprocessing). One image gives grid [1, h, w] in
    patches, pixel_values [h*w, C*P*P] uint8 (raw, one frame; `normalized` widens it to
    transformers' [h*w, C*T*P*P] float32) and h*w / merge_size² placeholder tokens."""

    def __init__(
        self,
        *,
        image_token_id: int = QWEN2_VL_IMAGE_TOKEN_ID,
        min_pixels: int = 56 * 56,
        max_pixels: int = 28 * 28 * 1280,
        patch_size: int = 14,
        temporal_patch_size: int = 2,
        merge_size: int = 2,
        pixels: PixelOptions = PIXELS,
    ) -> None:
        if min_pixels > max_pixels:
            raise ValueError(f"min_pixels ({min_pixels}) exceeds max_pixels ({max_pixels})")
        self.image_token_id = image_token_id
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.patch_size = patch_size
        self.temporal_patch_size = temporal_patch_size
        self.merge_size = merge_size
        self.pixels = pixels
        self.resample = pixels.resampling
        self._table = pixels.value_table()  # [C, 256]
        self._scale, self._shift = pixels.affine()

    @classmethod
    def from_pretrained(cls, model_dir: str, hf_config: dict[str, Any]) -> Qwen2VLProcessor:
        """Configured from model_dir/preprocessor_config.json (either key style: the older
        top-level min_pixels/max_pixels, which win as in transformers, or size.shortest_edge /
        size.longest_edge, which are pixel counts too) and config.json's image_token_id (at the
        top level, or in text_config for transformers v5 configs)."""
        path = os.path.join(model_dir, "preprocessor_config.json")
        pp: dict[str, Any] = {}
        if os.path.exists(path):
            with open(path) as f:
                pp = json.load(f)
        size = pp.get("size") or {}
        min_pixels = pp.get("min_pixels", size.get("shortest_edge", size.get("min_pixels")))
        max_pixels = pp.get("max_pixels", size.get("longest_edge", size.get("max_pixels")))
        token = hf_config.get("image_token_id")
        if token is None:
            token = (hf_config.get("text_config") or {}).get("image_token_id")
        kwargs: dict[str, Any] = {
            "image_token_id": token,
            "min_pixels": min_pixels,
            "max_pixels": max_pixels,
            **{key: pp.get(key) for key in ("patch_size", "temporal_patch_size", "merge_size")},
        }
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        processor = cls(**kwargs, pixels=PIXELS.updated(pp))
        # Imported here: the video module builds on this one's smart_resize and PIXELS.
        from fovea.tokenizer_service.processors.qwen2_vl_video import Qwen2VLVideo

        processor.video = Qwen2VLVideo.from_pretrained(model_dir, hf_config)
        return processor

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) an image of this size is processed at."""
        factor = self.patch_size * self.merge_size
        if self.pixels.do_resize:
            return smart_resize(height, width, factor, self.min_pixels, self.max_pixels)
        if height % factor or width % factor:
            raise ValueError(
                f"with do_resize off, image sides must be multiples of {factor}, "
                f"got {width}x{height}"
            )
        return height, width

    def preprocess(self, image: PIL.Image.Image) -> ProcessedImage:
        image = rgb_input(image, self.pixels.do_convert_rgb)
        height, width = self.resized_size(image.height, image.width)
        if (width, height) != image.size:
            pixels = resize_uint8(image, width, height, self.resample, self.resize_engine)
        else:
            pixels = np.asarray(image)  # [H, W, C] uint8
        P, M = self.patch_size, self.merge_size
        gh, gw = height // P, width // P
        n = gh * gw
        # [n, C*P*P] uint8, patches in transformers' order: merge block by merge block
        # (row-major), then the M×M patches within a block (row-major); each patch channel by
        # channel, rows then columns (the Conv3d weight's (C, P, P) order).
        blocks = pixels.reshape(gh // M, M, P, gw // M, M, P, CHANNELS)
        patches = np.ascontiguousarray(blocks.transpose(0, 3, 1, 4, 6, 2, 5))
        return ProcessedImage(
            pixel_values=patches.reshape(n, CHANNELS * P * P),
            grid=[1, gh, gw],
            num_tokens=n // (M * M),
            pixel_scale=self._scale,
            pixel_shift=self._shift,
        )

    def normalized(self, image: ProcessedImage) -> np.ndarray:
        """[n, C*T*P*P] float32: `image`'s values as transformers' processor gives them
        (rescaled, normalized, each patch repeated T times), bit for bit."""
        T, PP = self.temporal_patch_size, self.patch_size**2
        raw = image.pixel_values.reshape(-1, CHANNELS, PP)
        out = np.empty((raw.shape[0], CHANNELS, T, PP), dtype=np.float32)
        for c in range(CHANNELS):
            # uint8 indices are always in range: mode="clip" only skips the bounds check.
            out[:, c] = np.take(self._table[c], raw[:, c], mode="clip")[:, None]
        return out.reshape(raw.shape[0], -1)
