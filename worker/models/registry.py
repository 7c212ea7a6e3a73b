"""Architecture name (config.json `architectures[0]`) -> model class, imported lazily so that
checking a name needs no torch."""

from __future__ import annotations

import importlib
from typing import Any

# architecture -> (module under fovea.worker.models, class name)
_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("qwen2", "Qwen2ForCausalLM"),
    "Qwen2VLForConditionalGeneration": ("qwen2_vl", "Qwen2VLForConditionalGeneration"),
    "Qwen2_5_VLForConditionalGeneration": ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"),
    "Gemma3ForCausalLM": ("gemma3_text", "Gemma3ForCausalLM"),
    "Gemma3ForConditionalGeneration": ("gemma3", "Gemma3ForConditionalGeneration"),
    # The LLaVA family, converted and original layouts: one class, driven by the config.
    "LlavaForConditionalGeneration": ("llava", "LlavaForConditionalGeneration"),
    "LlavaNextForConditionalGeneration": ("llava", "LlavaForConditionalGeneration"),
    "LlavaOnevisionForConditionalGeneration": ("llava", "LlavaForConditionalGeneration"),
    "LlavaLlamaForCausalLM": ("llava", "LlavaForConditionalGeneration"),
    "LlavaMistralForCausalLM": ("llava", "LlavaForConditionalGeneration"),
    "LlavaQwenForCausalLM": ("llava", "LlavaForConditionalGeneration"),
    # MiniCPM-V: 2.6 (the hub's remote-code layout) and transformers' native 4.6.
    "MiniCPMV": ("minicpmv", "MiniCPMV"),
    "MiniCPMV4_6ForConditionalGeneration": ("minicpmv4_6", "MiniCPMV4_6ForConditionalGeneration"),
    "MllamaForConditionalGeneration": ("mllama", "MllamaForConditionalGeneration"),
    "DeepseekVLV2ForCausalLM": ("deepseek_vl2", "DeepseekVLV2ForCausalLM"),
}


class UnsupportedArchitecture(ValueError):
    pass


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def check_architecture(name: str) -> None:
    if name not in _MODELS:
        raise UnsupportedArchitecture(
            f"architecture {name!r} is not supported; supported: "
            f"{', '.join(supported_architectures())}"
        )


def model_class(name: str) -> Any:
    check_architecture(name)
    module, cls = _MODELS[name]
    return getattr(importlib.import_module(f"fovea.worker.models.{module}"), cls)
