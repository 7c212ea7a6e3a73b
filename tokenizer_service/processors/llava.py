"""LLaVA image preprocessing, equal to transformers' PIL-backend image processors
(`LlavaImageProcessorPil`, `LlavaNextImageProcessorPil`, `LlavaOnevisionImageProcessorPil`) and
the placeholder counts of their processors; the same steps for original-layout checkpoints,
configured from the tower (common/families/llava.py) when preprocessor_config.json is absent.

One tile (LLaVA-1.5): optionally pad to a square with the mean colour, resize (shortest edge,
or to height x width), centre-crop, rescale, normalize -> pixel_values [1, C, S, S].
Anyres (LLaVA-NeXT, OneVision alone in its request): the image is resized into its best-fit
pinpoint resolution (aspect kept), zero-padded to it (centred), cut into S x S tiles row-major,
after a base tile (the whole image resized to S x S) -> [1 + tiles, C, S, S]. OneVision with
several images in one request: each is padded square with the mean colour and is one tile.
Every step runs on uint8 pixels (PIL resizes, numpy pads and crops) as transformers' do;
rescale and normalize are one lookup table, bit-identical to their float arithmetic.
`grid` is the original [height, width]: the model needs it to unpad the tiles' features.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

import numpy as np
import PIL.Image

from fovea.common.families.llava import (
    LlavaSpec,
    image_token_count,
    llava_spec,
    resolve_image_token_id,
    select_best_resolution,
)
from fovea.common.families.llava_defaults import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from fovea.tokenizer_service.processors.base import (
    CHANNELS,
    ImageProcessor,
    PixelOptions,
    ProcessedImage,
    per_channel,
    rgb_input,
)

log = logging.getLogger(__name__)

BASE_ONLY = b"llava:base-only"  # ProcessedImage.variant of OneVision's several-images path
PIXELS = PixelOptions(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)  # bicubic

# transformers' image processor class defaults, for keys a preprocessor_config.json omits.
_CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "clip": {
        "size": {"shortest_edge": 224},
        "crop_size": {"height": 224, "width": 224},
        "do_center_crop": True,
    },
    "llava_onevision": {"size": {"height": 384, "width": 384}, "do_center_crop": False},
}


def resized_size(height: int, width: int, size: dict[str, int]) -> tuple[int, int]:
    """transformers' resize target: `shortest_edge` scales the short side to it (the long side
    truncated), `height`/`width` is exact."""
    if size.get("height") and size.get("width"):
        return int(size["height"]), int(size["width"])
    if size.get("shortest_edge") and not size.get("longest_edge"):
        s = int(size["shortest_edge"])
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(s * long / short)
        return (new_long, s) if width <= height else (s, new_long)
    raise ValueError(f"image processor size {size} is not supported")


def center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """[H, W, C] -> [height, width, C], centred; zero-padded first where it is too small."""
    h, w = pixels.shape[:2]
    top, left = (h - height) // 2, (w - width) // 2
    if top >= 0 and left >= 0:
        return pixels[top : top + height, left : left + width]
    new_h, new_w = max(h, height), max(w, width)
    pad_top, pad_left = math.ceil((new_h - h) / 2), math.ceil((new_w - w) / 2)
    canvas = np.zeros((new_h, new_w, pixels.shape[2]), dtype=pixels.dtype)
    canvas[pad_top : pad_top + h, pad_left : pad_left + w] = pixels
    top, left = top + pad_top, left + pad_left
    return canvas[max(0, top) : min(new_h, top + height), max(0, left) : min(new_w, left + width)]


def pad_to_square(pixels: np.ndarray, background: tuple[int, ...]) -> np.ndarray:
    """[H, W, C] -> [M, M, C], M = max(H, W), the image centred on `background`."""
    h, w = pixels.shape[:2]
    if h == w:
        return pixels
    m = max(h, w)
    canvas = np.empty((m, m, pixels.shape[2]), dtype=pixels.dtype)
    canvas[:] = np.asarray(background, dtype=pixels.dtype)
    if w > h:
        canvas[(m - h) // 2 : (m - h) // 2 + h] = pixels
    else:
        canvas[:, (m - w) // 2 : (m - w) // 2 + w] = pixels
    return canvas


class LlavaProcessor(ImageProcessor):
    """`image_token_id` is the `<image>` token; each image's count of it comes from
    `image_token_count` (common/families/llava.py)."""

    def __init__(
        self,
        spec: LlavaSpec,
        *,
        image_token_id: int,
        size: dict[str, int],
        crop_size: dict[str, int] | None = None,
        do_center_crop: bool = False,
        pad_square: bool = False,
        pixels: PixelOptions = PIXELS,
    ) -> None:
        self.spec = spec
        self.image_token_id = image_token_id
        self.size = size
        self.crop = (int(crop_size["height"]), int(crop_size["width"])) if crop_size else None
        self.do_center_crop = do_center_crop and self.crop is not None
        self.pad_square = pad_square
        self.pixels = pixels
        self.resample = pixels.resampling
        mean = per_channel(pixels.image_mean, "image_mean")
        self.background = tuple(int(x * 255) for x in mean)  # the pad colour: the mean
        self._table = pixels.value_table()  # [C, 256]
        if spec.anyres:
            # transformers: tiles of the crop height, else size height, else shortest edge.
            self.tile = int((self.crop or (0, 0))[0] or size.get("height") or size["shortest_edge"])
            self.base = (
                (int(size["height"]), int(size["width"]))
                if size.get("height") and size.get("width")
                else (int(size["shortest_edge"]),) * 2
            )
            if self.tile != spec.image_size:
                raise ValueError(
                    f"the image processor's {self.tile}-pixel tiles do not fit the tower's "
                    f"{spec.image_size}-pixel images"
                )

    @classmethod
    def from_pretrained(cls, model_dir: str, hf_config: dict[str, Any]) -> LlavaProcessor:
        """From model_dir/preprocessor_config.json (keys it omits take transformers' class
        defaults), or without one (original checkpoints) from the tower's own processor."""
        spec = llava_spec(hf_config)
        path = os.path.join(model_dir, "preprocessor_config.json")
        if os.path.exists(path):
            with open(path) as f:
                pp = json.load(f)
            family = "llava_onevision" if hf_config.get("model_type") == "llava_onevision" else ""
            defaults = _CLASS_DEFAULTS.get(family) or (
                _CLASS_DEFAULTS["clip"] if spec.layout == "hf" else spec.processor_defaults
            )
            pp = defaults | {k: v for k, v in pp.items() if v is not None}
            pins = pp.get("image_grid_pinpoints")
            if spec.anyres and pins and [list(p) for p in spec.pinpoints] != pins:
                log.warning("image_grid_pinpoints differ in config.json and the image "
                            "processor: using config.json's (the model's)")  # fmt: skip
        else:
            pp = dict(spec.processor_defaults)
        token = resolve_image_token_id(model_dir, spec)
        # LLaVA-1.5's do_pad pads square before resizing; anyres processors' do_pad pads the
        # batch (meaningless one image at a time).
        pad = spec.pad_to_square or (not spec.anyres and bool(pp.get("do_pad", False)))
        processor = cls(
            spec,
            image_token_id=token,
            size=pp["size"],
            crop_size=pp.get("crop_size"),
            do_center_crop=bool(pp.get("do_center_crop", False)),
            pad_square=pad,
            pixels=PIXELS.updated(pp),
        )
        video_token = hf_config.get("video_token_index", hf_config.get("video_token_id"))
        if hf_config.get("model_type") == "llava_onevision" and video_token is not None:
            from fovea.tokenizer_service.processors.llava_video import LlavaOnevisionVideo

            processor.video = LlavaOnevisionVideo.from_pretrained(model_dir, spec, int(video_token))
        return processor

    def preprocess(self, image: PIL.Image.Image) -> ProcessedImage:
        return self.preprocess_in_request(image, 1)

    def preprocess_in_request(self, image: PIL.Image.Image, num_images: int) -> ProcessedImage:
        image = rgb_input(image, self.pixels.do_convert_rgb)
        pixels = np.asarray(image)  # [H, W, C] uint8
        height, width = pixels.shape[:2]
        base_only = self.spec.multi_image_base_only and num_images > 1
        if not self.spec.anyres:
            tiles = [
                self._finish(pad_to_square(pixels, self.background) if self.pad_square else pixels)
            ]
        elif base_only:
            tiles = [self._finish(pad_to_square(pixels, self.background))]
        else:
            tiles = [self._finish(t) for t in self._anyres_tiles(pixels)]
        side = self.spec.image_size
        if any(t.shape[:2] != (side, side) for t in tiles):
            raise ValueError(
                f"processing gave {tiles[0].shape[1]}x{tiles[0].shape[0]} pixels; the vision "
                f"tower takes {side}x{side}"
            )
        out = np.empty((len(tiles), CHANNELS, side, side), dtype=np.float32)
        for i, tile in enumerate(tiles):
            for c in range(CHANNELS):
                # uint8 indices are always in range: mode="clip" only skips the bounds check.
                np.take(self._table[c], tile[:, :, c], out=out[i, c], mode="clip")
        return ProcessedImage(
            pixel_values=out,
            grid=[height, width],
            num_tokens=image_token_count(self.spec, height, width, base_only),
            variant=BASE_ONLY if base_only else b"",
        )

    def _resize(self, pixels: np.ndarray, height: int, width: int) -> np.ndarray:
        if pixels.shape[:2] == (height, width):
            return pixels  # PIL's resize to the same size is a copy
        img = PIL.Image.fromarray(pixels).resize((width, height), resample=self.resample)
        return np.asarray(img)

    def _finish(self, pixels: np.ndarray) -> np.ndarray:
        """transformers' per-tile resize and centre crop (uint8 [H, W, C])."""
        if self.pixels.do_resize:
            height, width = pixels.shape[:2]
            pixels = self._resize(pixels, *resized_size(height, width, self.size))
        if self.do_center_crop and self.crop is not None:
            pixels = center_crop(pixels, *self.crop)
        return pixels

    def _anyres_tiles(self, pixels: np.ndarray) -> list[np.ndarray]:
        """The base image, then the best-fit resolution's tiles row-major (uint8 [H, W, C])."""
        height, width = pixels.shape[:2]
        best_h, best_w = select_best_resolution(height, width, self.spec.pinpoints)
        # Fit inside (best_h, best_w), aspect kept (transformers' get_patch_output_size).
        if best_w / width < best_h / height:
            new_w, new_h = best_w, min(math.ceil(height * best_w / width), best_h)
        else:
            new_h, new_w = best_h, min(math.ceil(width * best_h / height), best_w)
        fitted = self._resize(pixels, new_h, new_w)
        top, left = (best_h - new_h) // 2, (best_w - new_w) // 2
        canvas = np.zeros((best_h, best_w, CHANNELS), dtype=np.uint8)
        canvas[top : top + new_h, left : left + new_w] = fitted
        t = self.tile
        tiles = [
            canvas[i : i + t, j : j + t] for i in range(0, best_h, t) for j in range(0, best_w, t)
        ]
        return [self._resize(pixels, *self.base), *tiles]
