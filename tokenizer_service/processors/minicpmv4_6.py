"""MiniCPM-V 4.6 image preprocessing and placeholder expansion, equal to transformers'
`MiniCPMV4_6ImageProcessorPil` + `MiniCPMV4_6Processor` (the views, layout and prompt text are
described in processors/minicpmv.py; this file holds what 4.6 does differently).

- Geometry on (height, width): view sides are multiples of patch_size * 4 (16x: the ViT's
  window merger and the MLP merger each fold 2x2) or patch_size * 2 (4x); slices on a
  [rows, cols] grid, ties between equally good grids going to more rows.
- Each view takes h * w / 16 (4x: / 4) placeholder tokens, the pad token being the
  tokenizer's `image_token` (`<|image_pad|>`), which is also what the model's chat template
  renders once per image: it is replaced token-wise by the image's text, exactly what
  transformers' text replacement tokenizes to (the text starts and ends with special tokens).
- Pixels: uint8 PIL resizes (bicubic by default), crops, then rescale and normalize with
  transformers' dtypes (one lookup table).
Marker and pad tokens come from tokenizer_config.json (`extra_special_tokens`), defaulting to
the released checkpoint's.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import PIL.Image

from fovea.common.families.minicpmv import read_json
from fovea.tokenizer_service.processors.base import PixelOptions, ProcessedImage, rgb_input
from fovea.tokenizer_service.processors.minicpmv import (
    SlicedImageProcessor,
    crop_grid,
    load_tokenizer,
    patch_layout,
)

PIXELS = PixelOptions()  # mean = std = 0.5, bicubic
# tokenizer attribute -> (marker name, the released checkpoint's token)
_TOKENS = {
    "image_start_token": ("image_start", "<image>"),
    "image_end_token": ("image_end", "</image>"),
    "slice_start_token": ("slice_start", "<slice>"),
    "slice_end_token": ("slice_end", "</slice>"),
    "image_token": ("pad", "<|image_pad|>"),
    "image_id_start_token": ("id_start", "<image_id>"),
    "image_id_end_token": ("id_end", "</image_id>"),
}


def _ensure_divide(length: float, divisor: int) -> int:
    return max(round(length / divisor) * divisor, divisor)


def best_resize(
    height: float, width: float, scale: int, multiple: int, allow_upscale: bool = False
) -> tuple[int, int]:
    """(height, width), multiples of `multiple`; scaled to about scale² pixels when larger
    (or always, with allow_upscale), aspect kept."""
    if height * width > scale * scale or allow_upscale:
        ratio = width / height
        height = int(scale / math.sqrt(ratio))
        width = int(height * ratio)
    return _ensure_divide(height, multiple), _ensure_divide(width, multiple)


def sliced_grid(height: int, width: int, scale: int, max_slices: int) -> list[int] | None:
    """[rows, cols], or None for an image that is not sliced: the factorization of a slice
    count around height*width/scale² closest in log aspect ratio, ties to more rows."""
    log_ratio = math.log(width / height)
    multiple = min(math.ceil(width * height / (scale * scale)), max_slices)
    if multiple <= 1:
        return None
    best, best_error = [1, 1], float("inf")
    for n in (multiple - 1, multiple, multiple + 1):
        if n == 1 or n > max_slices:
            continue
        for rows in range(1, n + 1):
            if n % rows:
                continue
            error = abs(log_ratio - math.log((n // rows) / rows))
            if error < best_error or (error == best_error and rows > best[0]):
                best, best_error = [rows, n // rows], error
    return best


def refine_size(
    height: int, width: int, grid: list[int], scale: int, multiple: int
) -> tuple[int, int]:
    """(height, width) of the copy the slices are cut from."""
    rows, cols = grid
    refine_h, refine_w = _ensure_divide(height, rows), _ensure_divide(width, cols)
    slice_h, slice_w = best_resize(refine_h / rows, refine_w / cols, scale, multiple, True)
    return slice_h * rows, slice_w * cols


class MiniCPMV4_6Processor(SlicedImageProcessor):
    """MiniCPM-V 4.6; `image_token_id` is the pad token `<|image_pad|>`."""

    def __init__(
        self,
        *,
        tokenizer: Any,
        markers: dict[str, str],
        max_slice_nums: int = 9,
        scale_resolution: int = 448,
        patch_size: int = 14,
        slice_mode: bool = True,
        downsample_mode: str = "16x",
        use_image_id: bool = True,
        pixels: PixelOptions = PIXELS,
    ) -> None:
        if not pixels.do_resize:
            raise ValueError("MiniCPM-V 4.6 with do_resize off is not supported")
        super().__init__(
            tokenizer=tokenizer,
            markers=markers,
            placeholder=markers["pad"],
            use_image_id=use_image_id,
            splice_tokens=True,
        )
        self.image_token_id = self.pad_id
        self.max_slices = max_slice_nums
        self.scale = scale_resolution
        self.patch = patch_size
        self.slice_mode = slice_mode
        fold = 2 if downsample_mode == "4x" else 4  # patches per side folded into a token
        self.multiple = patch_size * fold
        self.tokens_divisor = fold * fold
        self.pixels = pixels
        self.resample = pixels.resampling
        self._table = pixels.value_table()  # [C, 256]

    @classmethod
    def from_pretrained(cls, model_dir: str, hf_config: dict[str, Any]) -> MiniCPMV4_6Processor:
        """From preprocessor_config.json (slicing, pixels) and tokenizer_config.json (the
        marker tokens, top-level or under extra_special_tokens)."""
        pp = read_json(model_dir, "preprocessor_config.json")
        tok = read_json(model_dir, "tokenizer_config.json")
        extra = tok.get("extra_special_tokens")
        extra = extra if isinstance(extra, dict) else {}
        markers = {
            name: str(extra.get(attr, tok.get(attr, default)))
            for attr, (name, default) in _TOKENS.items()
        }
        keys = (
            "max_slice_nums", "scale_resolution", "patch_size", "slice_mode",
            "downsample_mode", "use_image_id",
        )  # fmt: skip
        kwargs = {key: pp.get(key) for key in keys}
        return cls(
            tokenizer=load_tokenizer(model_dir),
            markers=markers,
            pixels=PIXELS.updated(pp),
            **{k: v for k, v in kwargs.items() if v is not None},
        )

    def views(self, image: PIL.Image.Image) -> tuple[list[np.ndarray], list[int]]:
        """uint8 [H, W, C] views (global first, then slices row by row) and [rows, cols] of
        the slices ([0, 0]: none)."""
        image = rgb_input(image, self.pixels.do_convert_rgb)
        height, width = image.height, image.width
        grid = sliced_grid(height, width, self.scale, self.max_slices) if self.slice_mode else None
        h, w = best_resize(height, width, self.scale, self.multiple, allow_upscale=grid is None)
        views = [np.asarray(image.resize((w, h), resample=self.resample))]
        if grid is None:
            return views, [0, 0]
        rh, rw = refine_size(height, width, grid, self.scale, self.multiple)
        refined = np.asarray(image.resize((rw, rh), resample=self.resample))
        return views + crop_grid(refined, *grid), grid

    def preprocess(self, image: PIL.Image.Image) -> ProcessedImage:
        views, grid = self.views(image)
        parts = []
        for view in views:
            h, w = view.shape[0] // self.patch, view.shape[1] // self.patch
            pixels = patch_layout(view, self.patch, self._table)
            parts.append(ProcessedImage(pixels, [h, w], h * w // self.tokens_divisor))
        return ProcessedImage(
            pixel_values=np.empty(0, dtype=np.float32),
            grid=grid,
            num_tokens=sum(p.num_tokens for p in parts),
            spans=tuple(parts),
        )
