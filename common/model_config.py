"""What every process needs to know about a model directory, read from its JSON files only
(no torch, no transformers): architecture, context length, stop tokens."""

from __future__ import annotations

import json
import os
from typing import Any

import msgspec

from fovea.common.architectures import ARCHITECTURES, first_architecture
from fovea.common.families import FamilyConfigError


class ModelConfigError(ValueError):
    pass


class ModelInfo(msgspec.Struct, frozen=True, kw_only=True):
    path: str
    architecture: str
    model_type: str
    context_length: int
    vocab_size: int
    eos_token_ids: list[int]


def _text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    # v5 multimodal configs nest the language model under text_config.
    nested = cfg.get("text_config")
    if not isinstance(nested, dict):  # DeepSeek-VL2 nests it under language_config
        nested = cfg.get("language_config")
    return nested if isinstance(nested, dict) else cfg


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def read_model_info(path: str, context_length: int | None = None) -> ModelInfo:
    """Raise ModelConfigError (one clear line) for a missing or unusable directory."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise ModelConfigError(f"model path {path!r} is not a directory")
    if not os.path.isfile(cfg_path):
        raise ModelConfigError(f"no config.json in {path!r}: not a Hugging Face model directory")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ModelConfigError(f"cannot read {cfg_path}: {e}") from e
    archs = cfg.get("architectures") or []
    if not archs:
        raise ModelConfigError(f"{cfg_path} names no architectures")
    row = first_architecture(cfg)
    if row is not None and row.config_check is not None:
        # The family's checks (a LLaVA tower and image token, an Mllama processor that agrees
        # with its tower, ...), before any process starts.
        try:
            row.config_check(path, cfg)
        except FamilyConfigError as e:
            raise ModelConfigError(f"{cfg_path}: {e}") from e
    text = _text_config(cfg)
    model_max = int(
        text.get("max_position_embeddings") or cfg.get("max_position_embeddings") or 2048
    )
    if context_length is not None and context_length > model_max:
        raise ModelConfigError(
            f"--context-length {context_length} exceeds the model's {model_max} positions"
        )
    eos = _as_ids(text.get("eos_token_id", cfg.get("eos_token_id")))
    gen_path = os.path.join(path, "generation_config.json")
    if os.path.isfile(gen_path):
        with open(gen_path) as f:
            eos += [t for t in _as_ids(json.load(f).get("eos_token_id")) if t not in eos]
    return ModelInfo(
        path=path,
        architecture=str(archs[0]),
        model_type=str(cfg.get("model_type", "")),
        context_length=context_length or model_max,
        vocab_size=int(text.get("vocab_size") or cfg.get("vocab_size") or 0),
        eos_token_ids=eos,
    )


def tp_size_problem(cfg: dict[str, Any], tp_size: int) -> str | None:
    """Why the language model of config.json `cfg` cannot be split over `tp_size` ranks (heads
    and MLP columns evenly; KV heads evenly, or replicated when fewer than the ranks), naming
    the sizes that work; None when it can."""
    text = _text_config(cfg)
    heads = int(text.get("num_attention_heads") or 0)
    if not heads:
        return None
    kv = int(text.get("num_key_value_heads") or heads)
    inter = int(text.get("intermediate_size") or 0)
    # Split like the decoder too: MoE experts (each expert's width, worker/layers/moe.py) and
    # the vision towers that split heads and MLP.
    others = _moe_and_tower_splits(cfg, text)

    def fits(t: int) -> bool:
        return (
            heads % t == 0
            and (kv % t == 0 or t % kv == 0)
            and (inter % t == 0)
            and all(n % t == 0 for n in others.values())
        )

    if fits(tp_size):
        return None
    valid = ", ".join(str(t) for t in range(1, heads + 1) if fits(t))
    extra = "".join(f", {what} {n}" for what, n in others.items())
    return (
        f"--tp-size {tp_size} cannot split this model ({heads} attention heads, {kv} KV heads, "
        f"MLP width {inter}{extra}); valid sizes: {valid}"
    )


def _moe_and_tower_splits(cfg: dict[str, Any], text: dict[str, Any]) -> dict[str, int]:
    """Sizes besides the decoder's heads and MLP that tensor parallelism splits evenly."""
    out: dict[str, int] = {}
    if text.get("n_routed_experts"):
        out["expert width"] = int(text.get("moe_intermediate_size") or 0)
    vision = cfg.get("vision_config")
    if not isinstance(vision, dict):
        return out
    if "language_config" in cfg:
        width = int(vision.get("width", 1024))
        out["vision heads"] = int(vision.get("heads", 16))
        out["vision MLP width"] = int(width * float(vision.get("mlp_ratio", 4)))
    elif vision.get("num_attention_heads") and _vision_tp_split(cfg):
        # SigLIP / CLIP / Mllama towers split their heads and MLP like the decoder (Qwen2-VL's
        # tower keeps its attention whole: left out).
        out["vision heads"] = int(vision["num_attention_heads"])
        if vision.get("intermediate_size"):
            out["vision MLP width"] = int(vision["intermediate_size"])
    return out


def _vision_tp_split(cfg: dict[str, Any]) -> bool:
    row = first_architecture(cfg)
    return row is None or row.capabilities.vision_tp_split


def images_attend_bidirectionally(architecture: str) -> bool:
    """An image's tokens attend to each other in full during prefill (transformers'
    token_type_ids mask): the scheduler must keep each image inside one prefill chunk."""
    row = ARCHITECTURES.get(architecture)
    return row is not None and row.capabilities.bidirectional_images
