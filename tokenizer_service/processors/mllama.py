"""Llama 3.2 Vision (Mllama) image preprocessing, equal to transformers'
`MllamaImageProcessorPil` bit for bit: the image is resized (uint8, PIL, bilinear by default)
to fit the best canvas of whole tiles (common/families/mllama.py), padded with zeros at the
bottom and right to that canvas, rescaled and normalized (a per-channel lookup table with
transformers' dtype steps; the padding is normalized too, as there) and cut into tiles in
row-major order.

The image stays ONE `<|image|>` token in the prompt (the model reads images through
cross-attention, not placeholder embeddings): `num_tokens` is 1, `pixel_values` is
[num_tiles, C, tile, tile] float32 (the worker pads to max_num_tiles as transformers' batch
packing does) and `grid` is [aspect_ratio_id, num_tiles].
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import PIL.Image

from fovea.common.families.mllama import (
    MllamaConfigError,
    MllamaGeometry,
    fit_to_canvas,
    optimal_canvas,
    tile_arrangements,
)
from fovea.tokenizer_service.processors.base import (
    CHANNELS,
    ImageProcessor,
    PixelOptions,
    ProcessedImage,
    rgb_input,
)

# MllamaImageProcessor's defaults: mean = std = 0.5, bilinear.
PIXELS = PixelOptions(resample=PIL.Image.Resampling.BILINEAR)
MLLAMA_IMAGE_TOKEN_ID = 128256  # <|image|> in Llama 3.2 Vision


class MllamaProcessor(ImageProcessor):
    def __init__(
        self,
        *,
        image_token_id: int = MLLAMA_IMAGE_TOKEN_ID,
        tile: int = 224,
        max_image_tiles: int = 4,
        do_pad: bool = True,
        pixels: PixelOptions = PIXELS,
    ) -> None:
        if not (pixels.do_resize and do_pad):
            raise ValueError("Mllama image processing needs do_resize and do_pad (as transformers)")
        if max_image_tiles < 1:
            raise ValueError(f"max_image_tiles must be >= 1, got {max_image_tiles}")
        self.image_token_id = image_token_id
        self.tile = tile
        self.arrangements = tile_arrangements(max_image_tiles)
        self.pixels = pixels
        self.resample = pixels.resampling
        # [C, 256]: every uint8 value of each channel, rescaled and normalized
        self._table = pixels.value_table()

    @classmethod
    def from_pretrained(cls, model_dir: str, hf_config: dict[str, Any]) -> MllamaProcessor:
        """From model_dir/preprocessor_config.json (size, max_image_tiles, mean/std, ...;
        transformers' defaults for what it lacks, the tower's tile size for `size`) and
        config.json's image_token_index. The tiles must be the tower's (size and count)."""
        path = os.path.join(model_dir, "preprocessor_config.json")
        pp: dict[str, Any] = {}
        if os.path.exists(path):
            with open(path) as f:
                pp = json.load(f)
        size = pp.get("size") or {}
        if size.get("height", 224) != size.get("width", 224):
            raise MllamaConfigError(f"Mllama tiles must be square, got size {size}")
        geo = MllamaGeometry.from_hf(hf_config)
        kwargs: dict[str, Any] = {
            "image_token_id": hf_config.get("image_token_index"),
            "tile": size.get("height", geo.tile),  # none saved: the tower's
            "max_image_tiles": pp.get("max_image_tiles"),
            "do_pad": pp.get("do_pad"),
        }
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        processor = cls(**kwargs, pixels=PIXELS.updated(pp))
        if processor.tile != geo.tile or tuple(processor.arrangements) != geo.arrangements:
            raise MllamaConfigError(
                f"the image processor's {processor.tile}px tiles in "
                f"{processor.arrangements} do not match the tower's {geo.tile}px tiles in "
                f"{list(geo.arrangements)}"
            )
        return processor

    def preprocess(self, image: PIL.Image.Image) -> ProcessedImage:
        image = rgb_input(image, self.pixels.do_convert_rgb)
        tile = self.tile
        rows, cols = optimal_canvas(image.height, image.width, self.arrangements, tile)
        height, width = fit_to_canvas(image.height, image.width, rows * tile, cols * tile, tile)
        if (width, height) != image.size:
            image = image.resize((width, height), resample=self.resample)
        # [C, canvas_h, canvas_w] uint8, the image at the top left and zeros (normalized below
        # like any pixel, as transformers pads before rescaling) elsewhere.
        canvas = np.zeros((CHANNELS, rows * tile, cols * tile), dtype=np.uint8)
        canvas[:, :height, :width] = np.asarray(image).transpose(2, 0, 1)
        # Tiles row-major: [rows * cols, C, tile, tile], still uint8.
        tiles = canvas.reshape(CHANNELS, rows, tile, cols, tile).transpose(1, 3, 0, 2, 4)
        tiles = np.ascontiguousarray(tiles).reshape(rows * cols, CHANNELS, tile, tile)
        out = np.empty(tiles.shape, dtype=np.float32)
        for c in range(CHANNELS):
            # uint8 indices are always in range: mode="clip" only skips the bounds check.
            np.take(self._table[c], tiles[:, c], out=out[:, c], mode="clip")
        aspect_ratio_id = self.arrangements.index((rows, cols)) + 1
        return ProcessedImage(pixel_values=out, grid=[aspect_ratio_id, rows * cols], num_tokens=1)
