"""MiniCPM-V configuration, read the same way by the launcher, the tokenizer (image processor)
and the worker (model): JSON only, no torch, no transformers.

Two layouts are served:
- "2.6": openbmb/MiniCPM-V-2_6 as published on the hub (remote code): `architectures`
  ["MiniCPMV"], `model_type` minicpmv, `version` 2.6, the Qwen2 language model's fields at the
  top level, a SigLIP `vision_config` (variable-resolution "navit" input), `query_num` resampler
  queries per slice; slicing settings in preprocessor_config.json (`max_slice_nums`,
  `scale_resolution`, `patch_size`, `slice_mode`, `use_image_id`, `image_feature_size`, the
  marker tokens), config.json's `slice_config` / `image_size` when that file is absent.
  Earlier versions (2.0, 2.5) use other language models and prompt layouts: refused.
- "4.6": transformers' native `MiniCPMV4_6ForConditionalGeneration` (`model_type`
  minicpmv4_6): nested `text_config` / `vision_config`, the ViT window-attention merger after
  `insert_layer_id`, an MLP merger, `downsample_mode` 16x (or 4x). The released checkpoints'
  language model is Qwen3.5 (`qwen3_5_text`: linear-attention layers with recurrent state),
  which Fovea's paged-KV decoders do not implement: only a llama / mistral / qwen2
  `text_config` is served, anything else is refused at launch with that reason.
"""

from __future__ import annotations

import json
import os
from typing import Any

from fovea.common.families import FamilyConfigError

# architecture -> layout
MINICPMV_ARCHITECTURES = {"MiniCPMV": "2.6", "MiniCPMV4_6ForConditionalGeneration": "4.6"}
# text_config model types the 4.6 layout is served with (Fovea's Llama-family decoder)
TEXT_MODEL_TYPES = ("llama", "mistral", "qwen2")
# The resampler of the 2.6 layout has hidden_size // RESAMPLER_HEAD_DIM heads.
RESAMPLER_HEAD_DIM = 128


class MiniCPMVConfigError(FamilyConfigError):
    """A MiniCPM-V checkpoint Fovea cannot serve (one line, naming the reason)."""


def minicpmv_layout(hf_config: dict[str, Any]) -> str | None:
    """'2.6', '4.6', or None for a model of another family."""
    archs = hf_config.get("architectures") or [""]
    return MINICPMV_ARCHITECTURES.get(str(archs[0]))


def read_json(model_dir: str, name: str) -> dict[str, Any]:
    """model_dir/name as a dict; {} when the file is absent."""
    path = os.path.join(model_dir, name)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        data: dict[str, Any] = json.load(f)
    return data


def processor_settings(model_dir: str, hf_config: dict[str, Any]) -> dict[str, Any]:
    """The 2.6 layout's slicing settings: preprocessor_config.json's keys, falling back to
    config.json's (and to the published defaults)."""
    pp = read_json(model_dir, "preprocessor_config.json")
    slice_cfg = hf_config.get("slice_config") or {}
    return {
        "query_num": int(pp.get("image_feature_size", hf_config.get("query_num", 64))),
        "scale_resolution": int(pp.get("scale_resolution", hf_config.get("image_size", 448))),
        "patch_size": int(pp.get("patch_size", slice_cfg.get("patch_size", 14))),
        "max_slice_nums": int(pp.get("max_slice_nums", slice_cfg.get("max_slice_nums", 9))),
        "slice_mode": bool(pp.get("slice_mode", hf_config.get("slice_mode", True))),
        "use_image_id": bool(pp.get("use_image_id", hf_config.get("use_image_id", True))),
        "mean": list(pp.get("norm_mean", [0.5, 0.5, 0.5])),
        "std": list(pp.get("norm_std", [0.5, 0.5, 0.5])),
        "tokens": {
            key: str(pp.get(key, default))
            for key, default in (
                ("im_start", "<image>"),
                ("im_end", "</image>"),
                ("slice_start", "<slice>"),
                ("slice_end", "</slice>"),
                ("unk", "<unk>"),
                ("im_id_start", "<image_id>"),
                ("im_id_end", "</image_id>"),
            )
        },
    }


def check_minicpmv(model_dir: str, hf_config: dict[str, Any]) -> None:
    """Raise MiniCPMVConfigError for a MiniCPM-V checkpoint that cannot be served; nothing for
    a servable one or another family."""
    layout = minicpmv_layout(hf_config)
    if layout is None:
        return
    if not os.path.isfile(os.path.join(model_dir, "tokenizer.json")):
        raise MiniCPMVConfigError("MiniCPM-V needs the model's tokenizer.json (none found)")
    if not isinstance(hf_config.get("vision_config"), dict):
        raise MiniCPMVConfigError("MiniCPM-V config.json has no vision_config")
    try:
        if layout == "2.6":
            _check_2_6(model_dir, hf_config)
        else:
            _check_4_6(model_dir, hf_config)
    except MiniCPMVConfigError:
        raise
    except (TypeError, ValueError, KeyError) as e:  # a value of the wrong type or form
        raise MiniCPMVConfigError(f"malformed MiniCPM-V configuration: {e!r}") from e


def _check_2_6(model_dir: str, cfg: dict[str, Any]) -> None:
    version = str(cfg.get("version", ""))
    if version != "2.6":
        raise MiniCPMVConfigError(
            f"MiniCPM-V version {version or '2.0/2.5 (no version key)'} is not supported; "
            "Fovea serves the MiniCPMV layout of version 2.6"
        )
    hidden = int(cfg.get("hidden_size") or 0)
    if hidden < RESAMPLER_HEAD_DIM or hidden % RESAMPLER_HEAD_DIM:
        raise MiniCPMVConfigError(
            f"hidden_size {hidden} is not a multiple of {RESAMPLER_HEAD_DIM} (the resampler's "
            "head size)"
        )
    settings = processor_settings(model_dir, cfg)
    queries = int(cfg.get("query_num", 64))
    if settings["query_num"] != queries:
        raise MiniCPMVConfigError(
            f"preprocessor_config.json image_feature_size {settings['query_num']} differs from "
            f"config.json query_num {queries}"
        )
    vision_patch = int(cfg["vision_config"].get("patch_size", 14))
    if settings["patch_size"] != vision_patch:
        raise MiniCPMVConfigError(
            f"the image processor's patch_size {settings['patch_size']} differs from the "
            f"vision tower's {vision_patch}"
        )
    if settings["max_slice_nums"] < 1:
        raise MiniCPMVConfigError("max_slice_nums must be at least 1")


def _check_4_6(model_dir: str, cfg: dict[str, Any]) -> None:
    text = cfg.get("text_config")
    kind = str(text.get("model_type", "")) if isinstance(text, dict) else "qwen3_5_text"
    if kind not in TEXT_MODEL_TYPES:
        raise MiniCPMVConfigError(
            f"MiniCPM-V 4.6 with a {kind!r} language model is not supported (Qwen3.5's "
            "linear-attention layers keep recurrent state Fovea's paged KV cache does not "
            f"hold); supported text_config model types: {', '.join(TEXT_MODEL_TYPES)}"
        )
    vision = cfg["vision_config"]
    mode = str(cfg.get("downsample_mode", "16x"))
    if mode not in ("16x", "4x"):
        raise MiniCPMVConfigError(f"downsample_mode {mode!r} is not one of 16x, 4x")
    if list(cfg.get("merge_kernel_size") or [2, 2]) != [2, 2]:
        raise MiniCPMVConfigError("merge_kernel_size must be [2, 2]")
    if list(vision.get("window_kernel_size") or [2, 2]) != [2, 2]:
        raise MiniCPMVConfigError("vision_config.window_kernel_size must be [2, 2]")
    if int(cfg.get("merger_times", 1)) != 1:
        raise MiniCPMVConfigError(f"merger_times {cfg.get('merger_times')} is not supported")
    layers = int(vision.get("num_hidden_layers", 12))
    insert = int(cfg.get("insert_layer_id", 6))
    if mode == "16x" and not 0 <= insert < layers:
        raise MiniCPMVConfigError(
            f"insert_layer_id {insert} is outside the vision tower's {layers} layers"
        )
    if cfg.get("image_token_id") is None:
        raise MiniCPMVConfigError("MiniCPM-V 4.6 config.json sets no image_token_id")
    pp = read_json(model_dir, "preprocessor_config.json")
    pp_mode = str(pp.get("downsample_mode", "16x"))
    if pp_mode != mode:
        raise MiniCPMVConfigError(
            f"preprocessor_config.json downsample_mode {pp_mode} differs from config.json's {mode}"
        )
    if not pp.get("do_resize", True):
        raise MiniCPMVConfigError("MiniCPM-V 4.6 with do_resize off is not supported")
    patch = int(pp.get("patch_size", 14))
    if patch != int(vision.get("patch_size", 16)):
        raise MiniCPMVConfigError(
            f"the image processor's patch_size {patch} differs from the vision tower's "
            f"{vision.get('patch_size', 16)}"
        )
