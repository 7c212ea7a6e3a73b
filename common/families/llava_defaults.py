"""Built-in configuration that LLaVA checkpoints leave out, read by common/families/llava.py:
the hub vision towers original checkpoints name (their configs and image processors), and
transformers' defaults for vision and text configs and for each converted family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC

# Original-layout architectures -> their language model.
ORIGINAL_ARCHITECTURES = {
    "LlavaLlamaForCausalLM": "llama",
    "LlavaMistralForCausalLM": "mistral",
    "LlavaQwenForCausalLM": "qwen2",
}


@dataclass(frozen=True)
class KnownTower:
    vision_config: dict[str, Any]  # a transformers vision_config, model_type included
    image_processor: dict[str, Any]  # preprocessor_config.json keys of the tower's processor


# Hub towers the original checkpoints name, by their hub id.
KNOWN_TOWERS: dict[str, KnownTower] = {
    "openai/clip-vit-large-patch14-336": KnownTower(
        {
            "model_type": "clip_vision_model",
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "patch_size": 14,
            "image_size": 336,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
        },
        {
            "size": {"shortest_edge": 336},
            "crop_size": {"height": 336, "width": 336},
            "do_center_crop": True,
            "resample": BICUBIC,
            "image_mean": list(OPENAI_CLIP_MEAN),
            "image_std": list(OPENAI_CLIP_STD),
        },
    ),
    "google/siglip-so400m-patch14-384": KnownTower(
        {
            "model_type": "siglip_vision_model",
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "num_hidden_layers": 27,
            "num_attention_heads": 16,
            "patch_size": 14,
            "image_size": 384,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-6,
        },
        {
            "size": {"height": 384, "width": 384},
            "do_center_crop": False,
            "resample": BICUBIC,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
        },
    ),
}

# transformers' vision config defaults (older configs saved only what differs from them).
VISION_DEFAULTS: dict[str, dict[str, Any]] = {
    "clip_vision_model": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "num_channels": 3,
        "image_size": 224,
        "patch_size": 32,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
    },
    "siglip_vision_model": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "num_channels": 3,
        "image_size": 224,
        "patch_size": 16,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6,
    },
}

# transformers' text config defaults for the language models LLaVA checkpoints use
# (llava-hf configs often carry a partial text_config).
TEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
    },
    "mistral": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-6,
    },
    "qwen2": {
        "vocab_size": 151936,
        "hidden_size": 4096,
        "intermediate_size": 22016,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
    },
}

NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
ONEVISION_PINPOINTS = [[384 * h, 384 * w] for h in range(1, 7) for w in range(1, 7)]

# Per converted model_type: transformers' defaults for what its config may omit.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llava": {"tower": "openai/clip-vit-large-patch14-336", "layer": -2, "strategy": "default"},
    "llava_next": {
        "tower": "openai/clip-vit-large-patch14-336",
        "layer": -2,
        "strategy": "default",
    },
    "llava_onevision": {
        "tower": "google/siglip-so400m-patch14-384",
        "layer": -1,
        "strategy": "full",
    },
}
