"""MiniCPM-V image preprocessing and placeholder expansion: the shared slicing processor, and
the 2.6 layout (the hub's remote-code `MiniCPMVImageProcessor` + `MiniCPMVProcessor`, written
from their published format; the 4.6 layout is processors/minicpmv4_6.py).

An image becomes views: a global view (resized with its aspect kept, sides multiples of the
patch size) and, when the image is larger than scale_resolution², slices cut row by row from
a resized copy on a rows x cols grid picked by aspect ratio. Each view is normalized and laid
out patch by patch as pixel_values [C, P, L*P] (patch l, row-major over the view's [h, w]
patch grid, in columns l*P .. l*P+P-1: the navit layout the tower takes), with grid [h, w].
In the prompt each view is its own run of placeholder tokens between marker tokens:

    <image_id>k</image_id><image>{pad * n0}</image><slice>{pad * n1}</slice><slice>...
    \\n<slice>...   (one line of slices per grid row; <image_id> only with use_image_id)

so an image is a ProcessedImage whose `spans` are its views (one ImageInput each, offsets in
that order). 2.6: pad is `<unk>`, every view takes query_num tokens (the resampler's queries);
the chat template renders `(<image>./</image>)` per image, which the published processor
replaces in the rendered text before tokenizing. Its brackets are text that BPE merges with
neighbours, so the expansion is done the same way: decode the prompt, replace, encode. That
needs ids that round-trip through the tokenizer (every prompt encoded from text does); a raw
token-id prompt that does not is refused.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image

from fovea.common.families.minicpmv import processor_settings
from fovea.tokenizer_service.processors.base import (
    CHANNELS,
    ImageProcessor,
    ProcessedImage,
    rgb_input,
)

BICUBIC = PIL.Image.Resampling.BICUBIC
PLACEHOLDER_2_6 = "(<image>./</image>)"


def load_tokenizer(model_dir: str) -> Any:
    """The model's `tokenizers.Tokenizer` (the launcher checked tokenizer.json exists)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))


def patch_layout(view: np.ndarray, patch: int, table: np.ndarray) -> np.ndarray:
    """uint8 [H, W, C] (sides multiples of patch) -> float32 [C, P, (H/P)*(W/P)*P]: patch l
    (row-major) in columns l*P .. l*P+P-1, each value through the [C, 256] lookup table."""
    height, width, channels = view.shape
    gh, gw = height // patch, width // patch
    # [gh, P, gw, P, C] -> [C, P (row in patch), gh, gw, P (column in patch)]
    planes = np.ascontiguousarray(
        view.reshape(gh, patch, gw, patch, channels).transpose(4, 1, 0, 2, 3)
    ).reshape(channels, patch, gh * gw * patch)
    out = np.empty(planes.shape, dtype=np.float32)
    for c in range(channels):
        # uint8 indices are always in range: mode="clip" only skips the bounds check.
        np.take(table[c], planes[c], out=out[c], mode="clip")
    return out


class SlicedImageProcessor(ImageProcessor):
    """The prompt side both layouts share: marker tokens, the per-image text, expansion and
    the check that every view's placeholder run landed where expected. Subclasses set
    `image_token_id` (what the template renders once per image) and implement preprocess."""

    def __init__(
        self,
        *,
        tokenizer: Any,
        markers: dict[str, str],
        placeholder: str,
        use_image_id: bool,
        splice_tokens: bool,
    ) -> None:
        """markers: image_start, image_end, slice_start, slice_end, pad, id_start, id_end.
        placeholder: the template's text per image. splice_tokens: the placeholder is one
        special token, replaced token-wise (exact, since the expansion starts and ends with
        special tokens); otherwise the prompt is expanded as text."""
        self.tokenizer = tokenizer
        self.markers = markers
        ids = {}
        for name, token in markers.items():
            tid = tokenizer.token_to_id(token)
            if tid is None:
                raise ValueError(f"the tokenizer has no {token!r} token ({name})")
            ids[name] = int(tid)
        self.pad_id = ids["pad"]
        self.start_ids = frozenset((ids["image_start"], ids["slice_start"]))
        self.placeholder = placeholder
        self.use_image_id = use_image_id
        self.splice_tokens = splice_tokens

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def image_text(self, index: int, image: ProcessedImage) -> str:
        """The prompt text of the `index`-th image of the request (0-based)."""
        m = self.markers
        parts = image.parts
        text = f"{m['id_start']}{index}{m['id_end']}" if self.use_image_id else ""
        text += m["image_start"] + m["pad"] * parts[0].num_tokens + m["image_end"]
        rows, cols = image.grid
        if len(parts) > 1:
            slices = [
                m["slice_start"] + m["pad"] * p.num_tokens + m["slice_end"] for p in parts[1:]
            ]
            text += "\n".join("".join(slices[r * cols : (r + 1) * cols]) for r in range(rows))
        return text

    def expand_placeholders(
        self, ids: list[int], images: list[ProcessedImage]
    ) -> tuple[list[int], list[int]]:
        """Each image's placeholder becomes its views' text. Returns (new ids, offset of each
        view's first pad token: images in order, views in order)."""
        out = self._splice(ids, images) if self.splice_tokens else self._expand_text(ids, images)
        offsets: list[int] = []
        lengths: list[int] = []
        i = 0
        while i < len(out):
            if out[i] != self.pad_id:
                i += 1
                continue
            j = i
            while j < len(out) and out[j] == self.pad_id:
                j += 1
            if i == 0 or out[i - 1] not in self.start_ids:
                raise ValueError(f"the prompt has a stray {self.markers['pad']!r} token")
            offsets.append(i)
            lengths.append(j - i)
            i = j
        if lengths != [p.num_tokens for image in images for p in image.parts]:
            raise ValueError("the prompt's image placeholders could not be expanded")
        return out, offsets

    def _count_error(self, found: int, images: int) -> ValueError:
        return ValueError(
            f"the prompt has {found} image placeholders {self.placeholder!r} but {images} "
            "images were given"
        )

    def _splice(self, ids: list[int], images: list[ProcessedImage]) -> list[int]:
        out: list[int] = []
        k = 0
        for t in ids:
            if t != self.image_token_id:
                out.append(t)
                continue
            if k == len(images):
                raise self._count_error(ids.count(self.image_token_id), len(images))
            out.extend(self.encode(self.image_text(k, images[k])))
            k += 1
        if k != len(images):
            raise self._count_error(k, len(images))
        return out

    def _expand_text(self, ids: list[int], images: list[ProcessedImage]) -> list[int]:
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        if self.encode(text) != ids:
            raise ValueError(
                "the prompt's tokens do not round-trip through the tokenizer, so its image "
                f"placeholders {self.placeholder!r} cannot be expanded as the model's processor does"
            )
        pieces = text.split(self.placeholder)
        if len(pieces) - 1 != len(images):
            raise self._count_error(len(pieces) - 1, len(images))
        expanded = pieces[0] + "".join(
            self.image_text(k, image) + pieces[k + 1] for k, image in enumerate(images)
        )
        return self.encode(expanded)


# ---------------------------------------------------------------- the 2.6 layout's geometry
# Sizes are (width, height) as in the published code; round() is Python's (half to even).


def _ensure_divide(length: float, divisor: int) -> int:
    return max(round(length / divisor) * divisor, divisor)


def best_resize_2_6(
    width: float, height: float, scale: int, patch: int, allow_upscale: bool = False
) -> tuple[int, int]:
    """(width, height), multiples of patch; scaled to about scale² pixels when larger than
    that (or always, with allow_upscale), aspect kept."""
    if width * height > scale * scale or allow_upscale:
        ratio = width / height
        height = int(scale / math.sqrt(ratio))
        width = int(height * ratio)
    return _ensure_divide(width, patch), _ensure_divide(height, patch)


def sliced_grid_2_6(width: int, height: int, scale: int, max_slices: int) -> list[int] | None:
    """[cols, rows] of the slice grid, or None for an image that is not sliced: among the
    factorizations of the slice counts around width*height/scale², the one whose aspect is
    closest in log ratio (the first found on ties: fewer columns)."""
    log_ratio = math.log(width / height)
    multiple = min(math.ceil(width * height / (scale * scale)), max_slices)
    if multiple <= 1:
        return None
    best, best_error = [1, 1], float("inf")
    for n in (multiple - 1, multiple, multiple + 1):
        if n == 1 or n > max_slices:
            continue
        for cols in range(1, n + 1):
            if n % cols == 0:
                error = abs(log_ratio - math.log(cols / (n // cols)))
                if error < best_error:
                    best, best_error = [cols, n // cols], error
    return best


def refine_size_2_6(
    width: int, height: int, grid: list[int], scale: int, patch: int
) -> tuple[int, int]:
    """(width, height) of the copy the slices are cut from: every slice the best (upscaled)
    size of its share of the image."""
    cols, rows = grid
    refine_w, refine_h = _ensure_divide(width, cols), _ensure_divide(height, rows)
    slice_w, slice_h = best_resize_2_6(refine_w / cols, refine_h / rows, scale, patch, True)
    return slice_w * cols, slice_h * rows


def crop_grid(pixels: np.ndarray, rows: int, cols: int) -> list[np.ndarray]:
    """[H, W, C] cut into rows x cols equal tiles, row by row."""
    th, tw = pixels.shape[0] // rows, pixels.shape[1] // cols
    return [
        pixels[r * th : (r + 1) * th, c * tw : (c + 1) * tw]
        for r in range(rows)
        for c in range(cols)
    ]


def _table_2_6(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """[C, 256] float32: the published steps, float32 x / 255 then (x - mean) / std with mean
    and std cast to float32 (transformers' normalize), so a lookup equals them bit for bit."""
    x = np.broadcast_to(np.arange(256, dtype=np.float32) / 255, (CHANNELS, 256))
    m = np.array(mean, dtype=np.float32)[:, None]
    s = np.array(std, dtype=np.float32)[:, None]
    return np.ascontiguousarray((x - m) / s, dtype=np.float32)


class MiniCPMVProcessor(SlicedImageProcessor):
    """MiniCPM-V 2.6. `image_token_id` is `<image>`: once per image in the template's
    `(<image>./</image>)`."""

    def __init__(self, *, tokenizer: Any, settings: dict[str, Any]) -> None:
        tokens = settings["tokens"]
        markers = {
            "image_start": tokens["im_start"],
            "image_end": tokens["im_end"],
            "slice_start": tokens["slice_start"],
            "slice_end": tokens["slice_end"],
            "pad": tokens["unk"],
            "id_start": tokens["im_id_start"],
            "id_end": tokens["im_id_end"],
        }
        super().__init__(
            tokenizer=tokenizer,
            markers=markers,
            placeholder=PLACEHOLDER_2_6.replace("<image>", tokens["im_start"]).replace(
                "</image>", tokens["im_end"]
            ),
            use_image_id=bool(settings["use_image_id"]),
            splice_tokens=False,
        )
        self.image_token_id = int(tokenizer.token_to_id(tokens["im_start"]))
        self.query_num = int(settings["query_num"])
        self.scale = int(settings["scale_resolution"])
        self.patch = int(settings["patch_size"])
        self.max_slices = int(settings["max_slice_nums"])
        self.slice_mode = bool(settings["slice_mode"])
        self._table = _table_2_6(settings["mean"], settings["std"])

    @classmethod
    def from_pretrained(cls, model_dir: str, hf_config: dict[str, Any]) -> MiniCPMVProcessor:
        return cls(
            tokenizer=load_tokenizer(model_dir), settings=processor_settings(model_dir, hf_config)
        )

    def views(self, image: PIL.Image.Image) -> tuple[list[np.ndarray], list[int]]:
        """uint8 [H, W, C] views (global first, then slices row by row) and [rows, cols] of
        the slices ([0, 0]: none)."""
        image = rgb_input(image, True)
        width, height = image.size
        if not self.slice_mode:  # the image as it is; its sides must fit the patch grid
            if width % self.patch or height % self.patch:
                raise ValueError(
                    f"with slice_mode off, image sides must be multiples of {self.patch}, got "
                    f"{width}x{height}"
                )
            return [np.asarray(image)], [0, 0]
        grid = sliced_grid_2_6(width, height, self.scale, self.max_slices)
        size = best_resize_2_6(width, height, self.scale, self.patch, allow_upscale=grid is None)
        views = [np.asarray(image.resize(size, resample=BICUBIC))]
        if grid is None:
            return views, [0, 0]
        refine = refine_size_2_6(width, height, grid, self.scale, self.patch)
        refined = np.asarray(image.resize(refine, resample=BICUBIC))
        cols, rows = grid
        return views + crop_grid(refined, rows, cols), [rows, cols]

    def preprocess(self, image: PIL.Image.Image) -> ProcessedImage:
        views, grid = self.views(image)
        parts = []
        for view in views:
            pixels = patch_layout(view, self.patch, self._table)
            h, w = view.shape[0] // self.patch, view.shape[1] // self.patch
            parts.append(ProcessedImage(pixels, [h, w], self.query_num))
        return ProcessedImage(
            pixel_values=np.empty(0, dtype=np.float32),
            grid=grid,
            num_tokens=self.query_num * len(parts),
            spans=tuple(parts),
        )
