"""Gemma 3 image preprocessing and placeholder expansion, equal to transformers'
`Gemma3ImageProcessorPil` + `Gemma3Processor` with pan-and-scan off (its default, and
SGLang's): each image is resized (uint8, PIL, bilinear by default) to the tower's square
size, rescaled and normalized (mean = std = 0.5) into pixel_values [C, H, W] float32, and takes
`mm_tokens_per_image` placeholder tokens whatever its size.

Expansion: the chat template renders one `<start_of_image>` per image; transformers' processor
replaces it, in the text, by `\\n\\n<start_of_image>` + `<image_soft_token>` x N +
`<end_of_image>\\n\\n` and then tokenizes. The blank lines merge with neighbouring newlines
into other tokens (Gemma's vocabulary has one token per run of newlines), so a token-level
splice would differ. With the model's tokenizer.json we do what transformers does: decode the
prompt, replace, encode — when decoding round-trips (encoding the decoded text gives the same
ids), which holds for prompts made by encoding text. Otherwise the expansion is spliced in as
tokens, "\\n\\n" encoded on its own (without a tokenizer.json: left out, with a warning at
start-up). Image spans are the `<image_soft_token>` runs; `<start_of_image>` and
`<end_of_image>` around them are ordinary text tokens.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import numpy as np
import PIL.Image

from fovea.tokenizer_service.processors.base import (
    CHANNELS,
    ImageProcessor,
    PixelOptions,
    ProcessedImage,
    rgb_input,
)

log = logging.getLogger(__name__)

PIXELS = PixelOptions(resample=PIL.Image.Resampling.BILINEAR)  # mean = std = 0.5
BOI, EOI, SOFT = "<start_of_image>", "<end_of_image>", "<image_soft_token>"


class Gemma3Processor(ImageProcessor):
    """`image_token_id` is `<start_of_image>`: the one placeholder the template renders."""

    def __init__(
        self,
        *,
        boi_token_id: int,
        eoi_token_id: int,
        soft_token_id: int,
        tokens_per_image: int,
        height: int = 896,
        width: int = 896,
        tokenizer: Any = None,
        pixels: PixelOptions = PIXELS,
    ) -> None:
        """tokenizer: a `tokenizers.Tokenizer` of the model (None: token-level splicing)."""
        self.image_token_id = boi_token_id
        self.eoi_token_id = eoi_token_id
        self.soft_token_id = soft_token_id
        self.tokens_per_image = tokens_per_image
        self.height, self.width = height, width
        self.tokenizer = tokenizer
        self.pixels = pixels
        self.resample = pixels.resampling
        self._table = pixels.value_table()  # [C, 256]
        self._blank_ids = self._encode("\n\n") if tokenizer is not None else None

    @classmethod
    def from_pretrained(cls, model_dir: str, hf_config: dict[str, Any]) -> Gemma3Processor:
        """From model_dir/preprocessor_config.json (size, mean/std, ...), config.json's
        token ids and mm_tokens_per_image, and model_dir/tokenizer.json when present."""
        path = os.path.join(model_dir, "preprocessor_config.json")
        pp: dict[str, Any] = {}
        if os.path.exists(path):
            with open(path) as f:
                pp = json.load(f)
        if pp.get("do_pan_and_scan"):
            log.warning("Gemma 3 pan-and-scan is not supported: images are processed whole")
        size = pp.get("size") or {}
        tokenizer = None
        tok_path = os.path.join(model_dir, "tokenizer.json")
        if os.path.exists(tok_path):
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(tok_path)
        else:
            log.warning("no tokenizer.json: Gemma 3 image expansion leaves out its blank lines")
        kwargs: dict[str, Any] = {
            "boi_token_id": int(hf_config.get("boi_token_index", 255_999)),
            "eoi_token_id": int(hf_config.get("eoi_token_index", 256_000)),
            "soft_token_id": int(hf_config.get("image_token_index", 262_144)),
            "tokens_per_image": int(hf_config.get("mm_tokens_per_image", 256)),
            "height": size.get("height"),
            "width": size.get("width"),
            "tokenizer": tokenizer,
        }
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        return cls(**kwargs, pixels=PIXELS.updated(pp))

    def preprocess(self, image: PIL.Image.Image) -> ProcessedImage:
        image = rgb_input(image, self.pixels.do_convert_rgb)
        if self.pixels.do_resize and image.size != (self.width, self.height):
            image = image.resize((self.width, self.height), resample=self.resample)
        elif image.size != (self.width, self.height):
            raise ValueError(
                f"with do_resize off, images must be {self.width}x{self.height}, "
                f"got {image.width}x{image.height}"
            )
        planes = np.asarray(image).transpose(2, 0, 1)  # [C, H, W] uint8
        out = np.empty(planes.shape, dtype=np.float32)
        for c in range(CHANNELS):
            # uint8 indices are always in range: mode="clip" only skips the bounds check.
            np.take(self._table[c], planes[c], out=out[c], mode="clip")
        return ProcessedImage(
            pixel_values=out, grid=[self.height, self.width], num_tokens=self.tokens_per_image
        )

    def expand_placeholders(
        self, ids: list[int], images: list[ProcessedImage]
    ) -> tuple[list[int], list[int]]:
        """Each `<start_of_image>` becomes transformers' full image sequence. Returns (new ids,
        offset of each image's first `<image_soft_token>`)."""
        boi = self.image_token_id
        count = ids.count(boi)
        if count != len(images):
            raise ValueError(
                f"the prompt has {count} image placeholders but {len(images)} images were given"
            )
        if any(img.num_tokens != self.tokens_per_image for img in images):
            raise ValueError(f"a Gemma 3 image takes {self.tokens_per_image} tokens")
        out = self._expand_text(ids) if self.tokenizer is not None else None
        if out is None:
            out = self._expand_tokens(ids)
        offsets = [i for i, t in enumerate(out) if t == self.soft_token_id and out[i - 1] == boi]
        if len(offsets) != len(images) or out.count(self.soft_token_id) != sum(
            img.num_tokens for img in images
        ):
            raise ValueError("the prompt's image placeholders could not be expanded")
        return out, offsets

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def _expand_text(self, ids: list[int]) -> list[int] | None:
        """transformers' way (decode, replace in the text, encode); None if the prompt's ids
        are not what its decoded text encodes to."""
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        if self._encode(text) != ids:
            return None
        full = f"\n\n{BOI}{SOFT * self.tokens_per_image}{EOI}\n\n"
        return self._encode(text.replace(BOI, full))

    def _expand_tokens(self, ids: list[int]) -> list[int]:
        blank = self._blank_ids if self._blank_ids is not None else []
        image = [self.image_token_id, *[self.soft_token_id] * self.tokens_per_image]
        full = [*blank, *image, self.eoi_token_id, *blank]
        out: list[int] = []
        for t in ids:
            out.extend(full if t == self.image_token_id else (t,))
        return out
