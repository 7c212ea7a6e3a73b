"""The LLaVA family's configuration, read the same way by the tokenizer (image processor) and
the worker (model): no torch, no transformers, no hub.

Two checkpoint layouts are served. The Hugging Face converted ones (`model_type` llava,
llava_next, llava_onevision: nested `text_config` / `vision_config`) and the original ones
(`LlavaLlamaForCausalLM`, `LlavaQwenForCausalLM`, `LlavaMistralForCausalLM`: a flat language
model config plus `mm_*` keys, `mm_vision_tower` naming a hub tower). Both become one
`LlavaSpec`. An original checkpoint's tower config comes from `KNOWN_TOWERS`
(common/families/llava_defaults.py); Fovea's escape hatch for a tower not in the table is a
`mm_vision_tower_config` dict (a transformers vision_config with its `model_type`) in
config.json, which takes precedence.

The anyres geometry (best resolution, unpadding, anyres_max downscaling) is here too, so the
processor's placeholder count and the model's feature count come from one definition.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any

from fovea.common.families import FamilyConfigError
from fovea.common.families.llava_defaults import (
    FAMILY_DEFAULTS,
    KNOWN_TOWERS,
    NEXT_PINPOINTS,
    ONEVISION_PINPOINTS,
    ORIGINAL_ARCHITECTURES,
    TEXT_DEFAULTS,
    VISION_DEFAULTS,
)


class LlavaConfigError(FamilyConfigError):
    """A LLaVA config Fovea cannot serve (one line, naming the fix)."""


@dataclass(frozen=True)
class LlavaSpec:
    """What the processor and the model need, whatever the layout."""

    layout: str  # "hf" (converted) or "original"
    tower: str  # "clip" or "siglip"
    vision_config: dict[str, Any]  # complete transformers vision_config
    feature_layers: tuple[int, ...]  # hidden-state indices (0 = embeddings), concatenated
    drop_first: bool  # drop the first feature of each tile (the CLS token)
    projector: str  # "mlp" (linear_1, act, linear_2) or "linear"
    projector_act: str
    projector_bias: bool
    anyres: bool  # tiles at a best-fit resolution + a base image, unpadded, newline per row
    pinpoints: tuple[tuple[int, int], ...]  # (height, width) resolutions anyres picks from
    max_tiles: int  # anyres_max_N: features downscaled past N tiles' worth; 0: no limit
    multi_image_base_only: bool  # OneVision: with several images each is one padded tile
    pad_to_square: bool  # original 'pad': a single-tile image is padded square first
    image_token_id: int | None  # None: the tokenizer's `<image>` token
    text_config: dict[str, Any]  # complete language model config, model_type included
    tie_word_embeddings: bool
    processor_defaults: dict[str, Any]  # preprocessor_config.json keys when it is absent

    @property
    def image_size(self) -> int:
        return int(self.vision_config["image_size"])

    @property
    def patches_per_side(self) -> int:
        return self.image_size // int(self.vision_config["patch_size"])

    @property
    def tile_features(self) -> int:
        """Features one tile gives after selection: patches (+1 CLS kept for CLIP 'full')."""
        cls = 1 if self.tower == "clip" else 0
        return self.patches_per_side**2 + cls - int(self.drop_first)


IMAGE_TOKEN = "<image>"


def is_llava(hf_config: dict[str, Any]) -> bool:
    archs = hf_config.get("architectures") or [""]
    return hf_config.get("model_type") in FAMILY_DEFAULTS or archs[0] in ORIGINAL_ARCHITECTURES


def llava_spec(hf_config: dict[str, Any]) -> LlavaSpec:
    """The spec of a config.json dict; LlavaConfigError for what cannot be served."""
    arch = (hf_config.get("architectures") or [""])[0]
    if arch in ORIGINAL_ARCHITECTURES:
        return _original_spec(hf_config, ORIGINAL_ARCHITECTURES[arch])
    family = str(hf_config.get("model_type", ""))
    if family not in FAMILY_DEFAULTS:
        raise LlavaConfigError(f"not a LLaVA config: model_type {family!r}, architecture {arch!r}")
    defaults = FAMILY_DEFAULTS[family]
    vision = hf_config.get("vision_config")
    if not isinstance(vision, dict):  # transformers' family default tower
        vision = dict(KNOWN_TOWERS[defaults["tower"]].vision_config)
        if family == "llava_onevision":
            vision["num_hidden_layers"] = 26  # LlavaOnevisionConfig's default drops the last
    vision = complete_vision_config(vision)
    text = hf_config.get("text_config")
    text = complete_text_config(text if isinstance(text, dict) else {"model_type": "llama"})
    layer = hf_config.get("vision_feature_layer", defaults["layer"])
    strategy = hf_config.get("vision_feature_select_strategy", defaults["strategy"])
    if strategy not in ("default", "full"):
        raise LlavaConfigError(f"vision_feature_select_strategy {strategy!r} is not supported")
    anyres = family != "llava"
    pins = hf_config.get("image_grid_pinpoints")
    if pins is None:
        pins = ONEVISION_PINPOINTS if family == "llava_onevision" else NEXT_PINPOINTS
    aspect = str(hf_config.get("vision_aspect_ratio", "anyres_max_9"))
    return _checked(
        LlavaSpec(
            layout="hf",
            tower=_tower_kind(vision),
            vision_config=vision,
            feature_layers=tuple(layer) if isinstance(layer, list) else (int(layer),),
            drop_first=strategy == "default",
            projector="mlp",
            projector_act=str(hf_config.get("projector_hidden_act", "gelu")),
            projector_bias=bool(hf_config.get("multimodal_projector_bias", True)),
            anyres=anyres,
            pinpoints=parse_pinpoints(pins, int(vision["image_size"])) if anyres else (),
            max_tiles=_max_tiles(aspect) if family == "llava_onevision" else 0,
            multi_image_base_only=family == "llava_onevision",
            pad_to_square=False,  # converted checkpoints say do_pad in preprocessor_config.json
            image_token_id=_image_token_id(hf_config),
            text_config=text,
            tie_word_embeddings=bool(
                hf_config.get("tie_word_embeddings") or text.get("tie_word_embeddings")
            ),
            processor_defaults=_tower_processor(vision),
        )
    )


def _original_spec(cfg: dict[str, Any], lm_type: str) -> LlavaSpec:
    vision = _original_tower(cfg)
    tower = _tower_kind(vision)
    if tower == "clip":
        select = str(cfg.get("mm_vision_select_feature", "patch"))
        if select not in ("patch", "cls_patch"):
            raise LlavaConfigError(f"mm_vision_select_feature {select!r} is not supported")
        layers: tuple[int, ...] = (int(cfg.get("mm_vision_select_layer", -2)),)
        drop_first = select == "patch"
    else:
        # LLaVA-NeXT's SigLIP tower deletes its last layer and takes the last hidden state,
        # whatever mm_vision_select_layer says; no CLS to drop.
        layers, drop_first = (-2,), False
    projector_type = str(cfg.get("mm_projector_type", "linear"))
    if projector_type == "linear":
        projector = "linear"
    elif projector_type == "mlp2x_gelu":
        projector = "mlp"
    else:
        raise LlavaConfigError(
            f"mm_projector_type {projector_type!r} is not supported (linear, mlp2x_gelu)"
        )
    aspect = str(cfg.get("image_aspect_ratio", "square"))
    anyres = aspect.startswith("anyres")
    merge = str(cfg.get("mm_patch_merge_type", "flat"))
    if anyres and "unpad" not in merge:
        raise LlavaConfigError(
            f"image_aspect_ratio {aspect!r} with mm_patch_merge_type {merge!r} is not "
            "supported (anyres needs spatial_unpad)"
        )
    text = complete_text_config(
        {k: v for k, v in cfg.items() if not k.startswith("mm_")} | {"model_type": lm_type}
    )
    max_tiles = _max_tiles(aspect) if aspect.startswith("anyres_max") else 0
    pins = cfg.get("image_grid_pinpoints") or []
    if anyres and not pins:
        raise LlavaConfigError(f"image_aspect_ratio {aspect!r} needs image_grid_pinpoints")
    return _checked(
        LlavaSpec(
            layout="original",
            tower=tower,
            vision_config=vision,
            feature_layers=layers,
            drop_first=drop_first,
            projector=projector,
            projector_act="gelu",
            projector_bias=True,
            anyres=anyres,
            pinpoints=parse_pinpoints(pins, int(vision["image_size"])) if anyres else (),
            max_tiles=max_tiles,
            # The converted OneVision's rule for several images, for the original anyres_max ones.
            multi_image_base_only=max_tiles > 0,
            pad_to_square=aspect == "pad",
            image_token_id=_image_token_id(cfg),
            text_config=text,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            processor_defaults=_tower_processor(vision),
        )
    )


def _checked(spec: LlavaSpec) -> LlavaSpec:
    side = spec.patches_per_side
    if spec.anyres and spec.tile_features != side * side:
        raise LlavaConfigError(
            f"anyres needs a {side}x{side} feature grid per tile, but the selected features "
            f"are {spec.tile_features} per tile (keep the CLS token only without anyres)"
        )
    for h, w in spec.pinpoints:
        if h % spec.image_size or w % spec.image_size:
            raise LlavaConfigError(
                f"image_grid_pinpoints {[h, w]} is not a multiple of the tower's "
                f"{spec.image_size}-pixel tiles"
            )
    return spec


def _original_tower(cfg: dict[str, Any]) -> dict[str, Any]:
    override = cfg.get("mm_vision_tower_config")
    if isinstance(override, dict):
        return complete_vision_config(override)
    name = str(cfg.get("mm_vision_tower") or cfg.get("vision_tower") or "")
    for known, tower in KNOWN_TOWERS.items():
        if name == known or name.rstrip("/").rsplit("/", 1)[-1] == known.rsplit("/", 1)[-1]:
            return complete_vision_config(tower.vision_config)
    raise LlavaConfigError(
        f"unknown vision tower {name!r} (mm_vision_tower); known: {', '.join(KNOWN_TOWERS)}; "
        "for another tower put its transformers vision_config (with model_type) in config.json "
        "as mm_vision_tower_config"
    )


def complete_vision_config(vision: dict[str, Any]) -> dict[str, Any]:
    kind = vision.get("model_type")
    if kind not in VISION_DEFAULTS:
        raise LlavaConfigError(
            f"vision tower model_type {kind!r} is not supported ({', '.join(VISION_DEFAULTS)})"
        )
    return VISION_DEFAULTS[kind] | vision


def complete_text_config(text: dict[str, Any]) -> dict[str, Any]:
    kind = str(text.get("model_type", "llama"))
    if kind not in TEXT_DEFAULTS:
        raise LlavaConfigError(
            f"language model {kind!r} is not supported under LLaVA ({', '.join(TEXT_DEFAULTS)})"
        )
    out = TEXT_DEFAULTS[kind] | {k: v for k, v in text.items() if v is not None}
    if kind == "qwen2":
        out["attention_bias"] = True  # Qwen2 always has q/k/v biases
    return out


def _tower_kind(vision: dict[str, Any]) -> str:
    return "clip" if vision["model_type"] == "clip_vision_model" else "siglip"


def _tower_processor(vision: dict[str, Any]) -> dict[str, Any]:
    """The tower's own image processor at its image size (CLIP: shortest edge + center crop,
    CLIP mean/std; SigLIP: a square resize, mean = std = 0.5)."""
    side = int(vision["image_size"])
    if _tower_kind(vision) == "clip":
        base = KNOWN_TOWERS["openai/clip-vit-large-patch14-336"].image_processor
        return base | {
            "size": {"shortest_edge": side},
            "crop_size": {"height": side, "width": side},
        }
    base = KNOWN_TOWERS["google/siglip-so400m-patch14-384"].image_processor
    return base | {"size": {"height": side, "width": side}}


def _image_token_id(cfg: dict[str, Any]) -> int | None:
    for key in ("image_token_index", "image_token_id"):
        if cfg.get(key) is not None:
            return int(cfg[key])
    return None


def _max_tiles(aspect: str) -> int:
    m = re.fullmatch(r"anyres_max_(\d+)", aspect)
    if m is None:
        raise LlavaConfigError(f"vision aspect ratio {aspect!r} is not anyres_max_<N>")
    return int(m.group(1))


def parse_pinpoints(pins: Any, tile: int) -> tuple[tuple[int, int], ...]:
    """(height, width) resolutions: a list of pairs, or LLaVA-NeXT's range string
    "(1x1),...,(6x6)" in tiles of `tile` pixels."""
    if isinstance(pins, str):
        found = re.findall(r"\((\d+)x(\d+)\)", pins)
        if not found:
            raise LlavaConfigError(f"image_grid_pinpoints {pins!r} is not understood")
        (h0, w0), (h1, w1) = (tuple(map(int, p)) for p in (found[0], found[-1]))
        return tuple((h * tile, w * tile) for h in range(h0, h1 + 1) for w in range(w0, w1 + 1))
    return tuple((int(h), int(w)) for h, w in pins)


def resolve_image_token_id(model_dir: str, spec: LlavaSpec) -> int:
    """config.json's image_token_index, else the id of the tokenizer's `<image>` added token
    (original checkpoints); LlavaConfigError naming the fix when there is neither."""
    if spec.image_token_id is not None:
        return spec.image_token_id
    path = os.path.join(model_dir, "tokenizer.json")
    if os.path.exists(path):
        with open(path) as f:
            for tok in json.load(f).get("added_tokens", []):
                if tok.get("content") == IMAGE_TOKEN:
                    return int(tok["id"])
    path = os.path.join(model_dir, "tokenizer_config.json")
    if os.path.exists(path):
        with open(path) as f:
            for tid, tok in (json.load(f).get("added_tokens_decoder") or {}).items():
                if tok.get("content") == IMAGE_TOKEN:
                    return int(tid)
    raise LlavaConfigError(
        f"the tokenizer has no {IMAGE_TOKEN} token and config.json sets no image_token_index; "
        f"add {IMAGE_TOKEN} to the tokenizer as a special token or set image_token_index"
    )


def check_llava(model_dir: str, hf_config: dict[str, Any]) -> None:
    """Raise LlavaConfigError (one line) if a LLaVA model directory cannot be served."""
    if is_llava(hf_config):
        resolve_image_token_id(model_dir, llava_spec(hf_config))


# ---------------------------------------------------------------------- anyres geometry


def select_best_resolution(
    height: int, width: int, pinpoints: tuple[tuple[int, int], ...]
) -> tuple[int, int]:
    """The (height, width) pinpoint keeping the most of the image, then wasting the least
    (transformers' select_best_resolution, first best wins)."""
    best = pinpoints[0]
    best_effective, best_wasted = 0, math.inf
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = w * h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (h, w), effective, wasted
    return best


def unpadded_shape(rows: int, cols: int, height: int, width: int) -> tuple[int, int]:
    """The (rows, cols) of a rows x cols feature grid left after cutting the padding an image
    of height x width got when it was fitted into the grid's aspect (transformers'
    unpad_image)."""
    if width / height > cols / rows:
        new = int(round(height * (cols / width), 7))
        return rows - 2 * ((rows - new) // 2), cols
    new = int(round(width * (rows / height), 7))
    return rows, cols - 2 * ((cols - new) // 2)


def anyres_max_shape(rows: int, cols: int, max_tiles: int, side: int) -> tuple[int, int]:
    """anyres_max_N: a feature grid larger than N tiles' worth (by more than 10% per side) is
    downscaled to about N tiles, aspect kept (LLaVA-OneVision)."""
    ratio = math.sqrt(rows * cols / (max_tiles * side**2))
    if ratio > 1.1:
        return int(rows // ratio), int(cols // ratio)
    return rows, cols


def anyres_feature_shape(spec: LlavaSpec, height: int, width: int) -> tuple[int, int, int, int]:
    """(tile rows, tile cols, feature rows, feature cols) of one image under anyres: the tile
    grid of its best resolution, and its unpadded (then anyres_max-downscaled) feature grid,
    before the newline column."""
    best_h, best_w = select_best_resolution(height, width, spec.pinpoints)
    tiles_h, tiles_w = best_h // spec.image_size, best_w // spec.image_size
    side = spec.patches_per_side
    rows, cols = unpadded_shape(tiles_h * side, tiles_w * side, height, width)
    if spec.max_tiles:
        rows, cols = anyres_max_shape(rows, cols, spec.max_tiles, side)
    return tiles_h, tiles_w, rows, cols


def image_token_count(spec: LlavaSpec, height: int, width: int, base_only: bool) -> int:
    """Placeholder tokens of one image of height x width: LLaVA-1.5 one tile; anyres the base
    tile, then each feature row + a newline; base_only (OneVision with several images) the
    base tile + one newline."""
    base = spec.tile_features
    if not spec.anyres:
        return base
    if base_only:
        return base + 1
    _, _, rows, cols = anyres_feature_shape(spec, height, width)
    return base + rows * (cols + 1)
