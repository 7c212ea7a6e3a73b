"""Image processors by model family: the registry.

`load_processor` picks the family from config.json's first architecture and imports only that
family's module. A family is added by writing its module (an `ImageProcessor` subclass with a
`from_pretrained(model_dir, hf_config)` classmethod) and one line in `_FAMILIES`.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from fovea.tokenizer_service.processors.base import ImageProcessor, ProcessedImage

__all__ = ["ImageProcessor", "ProcessedImage", "load_processor"]

log = logging.getLogger(__name__)

# architecture -> (module under fovea.tokenizer_service.processors, class name)
_FAMILIES: dict[str, tuple[str, str]] = {
    "Qwen2VLForConditionalGeneration": ("qwen2_vl", "Qwen2VLProcessor"),
    "Qwen2_5_VLForConditionalGeneration": ("qwen2_vl", "Qwen2VLProcessor"),
    "Gemma3ForConditionalGeneration": ("gemma3", "Gemma3Processor"),
    "LlavaForConditionalGeneration": ("llava", "LlavaProcessor"),
    "LlavaNextForConditionalGeneration": ("llava", "LlavaProcessor"),
    "LlavaOnevisionForConditionalGeneration": ("llava", "LlavaProcessor"),
    "LlavaLlamaForCausalLM": ("llava", "LlavaProcessor"),
    "LlavaMistralForCausalLM": ("llava", "LlavaProcessor"),
    "LlavaQwenForCausalLM": ("llava", "LlavaProcessor"),
    "MiniCPMV": ("minicpmv", "MiniCPMVProcessor"),
    "MiniCPMV4_6ForConditionalGeneration": ("minicpmv4_6", "MiniCPMV4_6Processor"),
    "DeepseekVLV2ForCausalLM": ("deepseek_vl2", "DeepseekVL2Processor"),
    "MllamaForConditionalGeneration": ("mllama", "MllamaProcessor"),
}


def load_processor(model_dir: str, hf_config: dict[str, Any]) -> ImageProcessor | None:
    """The image processor of the model's family, configured from model_dir (its
    preprocessor_config.json) and config.json's dict; None for a model that takes no images
    (text-only architectures, and vision architectures Fovea has no processor for yet)."""
    architectures = hf_config.get("architectures") or [""]
    family = _FAMILIES.get(architectures[0])
    if family is None:
        if "vision_config" in hf_config:
            log.warning("no image processor for %s: serving it as text-only", architectures[0])
        return None
    module_name, class_name = family
    module = importlib.import_module(f"{__name__}.{module_name}")
    processor: ImageProcessor = getattr(module, class_name).from_pretrained(model_dir, hf_config)
    return processor
