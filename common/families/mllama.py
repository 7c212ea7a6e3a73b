"""Llama 3.2 Vision (Mllama) geometry, read the same way by the launcher (checks), the
tokenizer (image processor) and the worker (vision tower): no torch, no transformers.

An image is resized to fit the best canvas of whole tiles (at most `max_num_tiles` tiles of
`image_size` pixels, in an arrangement of `supported_aspect_ratios`), padded to it, and cut
into tiles; its `aspect_ratio_id` is 1 + the arrangement's index in that list. The formulas
are transformers' `get_optimal_tiled_canvas` and `get_image_size_fit_to_canvas`, kept
bit-for-bit (float64 ratios, the same tie-breaks).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

from fovea.common.families import FamilyConfigError

MLLAMA_ARCHITECTURE = "MllamaForConditionalGeneration"


class MllamaConfigError(FamilyConfigError):
    """An Mllama checkpoint Fovea cannot serve (one line, naming the mismatch)."""


def tile_arrangements(max_tiles: int) -> list[tuple[int, int]]:
    """(tiles high, tiles wide) pairs with at most max_tiles tiles, in transformers' order:
    [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1)] for 4."""
    return [
        (a, b)
        for a in range(1, max_tiles + 1)
        for b in range(1, max_tiles + 1)
        if a * b <= max_tiles
    ]


def optimal_canvas(
    height: int, width: int, arrangements: list[tuple[int, int]], tile: int
) -> tuple[int, int]:
    """The (tiles high, tiles wide) arrangement an image is fitted to: the smallest upscale
    (>= 1) of any canvas, or when every canvas is smaller, the largest downscale; among equal
    scales the smallest area, the first listed on a tie."""
    scales = [min(a * tile / height, b * tile / width) for a, b in arrangements]
    ups = [s for s in scales if s >= 1]
    chosen = min(ups) if ups else max(scales)
    best = [ab for ab, s in zip(arrangements, scales, strict=True) if s == chosen]
    return min(best, key=lambda ab: ab[0] * ab[1])  # min keeps the first of equal areas


def fit_to_canvas(
    height: int, width: int, canvas_h: int, canvas_w: int, tile: int
) -> tuple[int, int]:
    """(height, width) the image is resized to: aspect kept, within the canvas, each side at
    least one tile (or the canvas) long."""
    target_w = min(max(width, tile), canvas_w)
    target_h = min(max(height, tile), canvas_h)
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


@dataclass(frozen=True)
class MllamaGeometry:
    """The vision side's shape: tile side in pixels, patch side, tiles per image at most, and
    the arrangement list (aspect ratio id k + 1 is arrangements[k])."""

    tile: int
    patch: int
    max_tiles: int
    arrangements: tuple[tuple[int, int], ...]

    @property
    def patches_per_tile(self) -> int:
        """Patches of one tile plus its class token."""
        return (self.tile // self.patch) ** 2 + 1

    @property
    def tokens_per_image(self) -> int:
        """Cross-attention keys of one image: every tile slot, padding tiles included."""
        return self.max_tiles * self.patches_per_tile

    @staticmethod
    def from_hf(cfg: dict[str, Any]) -> MllamaGeometry:
        """From config.json's dict (its vision_config; transformers' defaults for keys an
        older checkpoint left out)."""
        vision = cfg.get("vision_config") or {}
        max_tiles = int(vision.get("max_num_tiles", 4))
        ratios = vision.get("supported_aspect_ratios")
        arrangements = (
            tuple((int(a), int(b)) for a, b in ratios)
            if ratios
            else tuple(tile_arrangements(max_tiles))
        )
        if any(a * b > max_tiles for a, b in arrangements):
            raise MllamaConfigError(
                f"supported_aspect_ratios {ratios} exceed max_num_tiles {max_tiles}"
            )
        image_size = vision.get("image_size", 448)
        patch = vision.get("patch_size", 14)
        if isinstance(image_size, list | tuple) or isinstance(patch, list | tuple):
            raise MllamaConfigError("non-square Mllama image_size / patch_size is not supported")
        if int(image_size) % int(patch):
            raise MllamaConfigError(f"image_size {image_size} is not a multiple of {patch}")
        return MllamaGeometry(int(image_size), int(patch), max_tiles, arrangements)


def check_mllama(path: str, cfg: dict[str, Any]) -> None:
    """Raise MllamaConfigError when the checkpoint's image processor and model disagree
    (the tokenizer would make tiles the tower cannot take). Other architectures pass."""
    if (cfg.get("architectures") or [""])[0] != MLLAMA_ARCHITECTURE:
        return
    geo = MllamaGeometry.from_hf(cfg)
    vision = cfg.get("vision_config") or {}
    hidden = int(vision.get("hidden_size", 1280))
    picks = vision.get("intermediate_layers_indices") or [3, 7, 15, 23, 30]
    out_dim = int(vision.get("vision_output_dim", 7680))
    if out_dim != hidden * (1 + len(picks)):
        raise MllamaConfigError(
            f"vision_output_dim {out_dim} is not hidden_size {hidden} x (1 + "
            f"{len(picks)} intermediate layers)"
        )
    text = cfg.get("text_config") or {}
    n_layers = int(text.get("num_hidden_layers", 40))
    cross = text.get("cross_attention_layers") or []
    if len(set(cross)) != len(cross) or any(not 0 <= int(i) < n_layers for i in cross):
        raise MllamaConfigError(f"cross_attention_layers {cross} do not fit {n_layers} layers")
    pp_path = os.path.join(path, "preprocessor_config.json")
    if not os.path.isfile(pp_path):
        return  # the processor then takes the tower's tile size and 4 tiles
    with open(pp_path) as f:
        pp = json.load(f)
    size = pp.get("size") or {}
    if size and (size.get("height") != geo.tile or size.get("width") != geo.tile):
        raise MllamaConfigError(
            f"preprocessor_config.json size {size} differs from the tower's {geo.tile}x{geo.tile} "
            "tiles"
        )
    tiles = int(pp.get("max_image_tiles", 4))
    if tiles != geo.max_tiles or tuple(tile_arrangements(tiles)) != geo.arrangements:
        raise MllamaConfigError(
            f"preprocessor_config.json max_image_tiles {tiles} does not match the tower's "
            f"{geo.max_tiles} tiles / supported_aspect_ratios {list(geo.arrangements)}"
        )
