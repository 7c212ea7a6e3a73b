"""The architecture table: config.json's `architectures[0]` -> everything Fovea keys on it.

A row names the family, the worker's model class, the tokenizer's image processor class, the
checker a checkpoint passes before any process starts, the chat template its checkpoints are
usually served with, and the capabilities other modules branch on (the worker's runner, the
scheduler's chunking, the tensor-parallel size check). Classes are named by module and class
name and imported only where they are built (the worker its model, the tokenizer service its
processor), so this module, the launcher and the scheduler stay free of torch.

Adding a family: its files (common/families/<family>.py when its config needs checks,
worker/models/<family>.py, tokenizer_service/processors/<family>.py), then a row here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fovea.common.families.deepseek_vl2 import check_deepseek_vl2
from fovea.common.families.llava import check_llava
from fovea.common.families.minicpmv import check_minicpmv
from fovea.common.families.mllama import check_mllama

# (model directory, config.json's dict) -> None; raises the family's FamilyConfigError.
ConfigCheck = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class ClassRef:
    """A class named by module and class name, imported on first use."""

    module: str
    name: str

    def load(self) -> Any:
        return getattr(importlib.import_module(self.module), self.name)


def _model(module: str, name: str) -> ClassRef:
    return ClassRef(f"fovea.worker.models.{module}", name)


def _processor(module: str, name: str) -> ClassRef:
    return ClassRef(f"fovea.tokenizer_service.processors.{module}", name)


@dataclass(frozen=True)
class Capabilities:
    """What the model does with images, beyond a causal LM over token ids. The model class
    implements the matching protocol of worker/models/base.py."""

    # A vision tower turns images into embeddings (`encode_images`); with neither flag below
    # they replace the image placeholder tokens' rows.
    encodes_images: bool = False
    # Positions are M-RoPE's three axes (`mrope_positions`, Qwen2-VL).
    mrope_positions: bool = False
    # An image's tokens attend to each other in full during prefill (Gemma 3): the scheduler
    # never splits an image across chunks nor starts a chunk from a hit inside one.
    bidirectional_images: bool = False
    # Images reach the decoder through cross-attention layers whose image K/V live in the
    # worker's image pool (Mllama); their placeholder tokens stay token embeddings.
    cross_attention_images: bool = False
    # The vision tower splits its attention heads and MLP across tensor-parallel ranks, so
    # they limit --tp-size (Qwen2-VL's keeps its attention whole).
    vision_tp_split: bool = True


TEXT = Capabilities()
VISION = Capabilities(encodes_images=True)


@dataclass(frozen=True)
class Architecture:
    family: str
    model: ClassRef  # the worker's model class (worker/models/)
    processor: ClassRef | None = None  # the image processor; None: the model takes no images
    config_check: ConfigCheck | None = None  # runs in common/model_config.read_model_info
    # The built-in template (tokenizer_service/builtin_templates.py) its checkpoints are
    # usually served with; None: the tokenizer's own (or, MiniCPM-V 4.6, the model's file).
    # Documentation and tests only: --chat-template is never chosen from it.
    chat_template: str | None = None
    capabilities: Capabilities = TEXT


def _llava(chat_template: str) -> Architecture:
    """LLaVA, converted and original layouts: one model class, driven by the config."""
    return Architecture(
        family="llava",
        model=_model("llava", "LlavaForConditionalGeneration"),
        processor=_processor("llava", "LlavaProcessor"),
        config_check=check_llava,
        chat_template=chat_template,
        capabilities=VISION,
    )


def _qwen2_vl(model: ClassRef) -> Architecture:
    return Architecture(
        family="qwen2_vl",
        model=model,
        processor=_processor("qwen2_vl", "Qwen2VLProcessor"),
        chat_template="qwen2-vl",
        capabilities=Capabilities(encodes_images=True, mrope_positions=True, vision_tp_split=False),
    )


ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": Architecture("llama", _model("llama", "LlamaForCausalLM")),
    "MistralForCausalLM": Architecture("llama", _model("llama", "LlamaForCausalLM")),
    "Qwen2ForCausalLM": Architecture("qwen2", _model("qwen2", "Qwen2ForCausalLM")),
    "Qwen2VLForConditionalGeneration": _qwen2_vl(
        _model("qwen2_vl", "Qwen2VLForConditionalGeneration")
    ),
    "Qwen2_5_VLForConditionalGeneration": _qwen2_vl(
        _model("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration")
    ),
    "Gemma3ForCausalLM": Architecture("gemma3", _model("gemma3_text", "Gemma3ForCausalLM")),
    "Gemma3ForConditionalGeneration": Architecture(
        family="gemma3",
        model=_model("gemma3", "Gemma3ForConditionalGeneration"),
        processor=_processor("gemma3", "Gemma3Processor"),
        chat_template="gemma-it",
        capabilities=Capabilities(encodes_images=True, bidirectional_images=True),
    ),
    "LlavaForConditionalGeneration": _llava("vicuna_v1.1"),
    "LlavaNextForConditionalGeneration": _llava("vicuna_v1.1"),  # Llama 3: llava_llama_3
    "LlavaOnevisionForConditionalGeneration": _llava("chatml-llava"),
    "LlavaLlamaForCausalLM": _llava("vicuna_v1.1"),  # Llama3-LLaVA-NeXT: llava_llama_3
    "LlavaMistralForCausalLM": _llava("vicuna_v1.1"),
    "LlavaQwenForCausalLM": _llava("chatml-llava"),
    # MiniCPM-V: 2.6 (the hub's remote-code layout) and transformers' native 4.6.
    "MiniCPMV": Architecture(
        family="minicpmv",
        model=_model("minicpmv", "MiniCPMV"),
        processor=_processor("minicpmv", "MiniCPMVProcessor"),
        config_check=check_minicpmv,
        chat_template="minicpmv",
        capabilities=VISION,
    ),
    "MiniCPMV4_6ForConditionalGeneration": Architecture(
        family="minicpmv",
        model=_model("minicpmv4_6", "MiniCPMV4_6ForConditionalGeneration"),
        processor=_processor("minicpmv4_6", "MiniCPMV4_6Processor"),
        config_check=check_minicpmv,
        capabilities=VISION,
    ),
    "MllamaForConditionalGeneration": Architecture(
        family="mllama",
        model=_model("mllama", "MllamaForConditionalGeneration"),
        processor=_processor("mllama", "MllamaProcessor"),
        config_check=check_mllama,
        chat_template="llama_3_vision",
        capabilities=Capabilities(encodes_images=True, cross_attention_images=True),
    ),
    "DeepseekVLV2ForCausalLM": Architecture(
        family="deepseek_vl2",
        model=_model("deepseek_vl2", "DeepseekVLV2ForCausalLM"),
        processor=_processor("deepseek_vl2", "DeepseekVL2Processor"),
        config_check=check_deepseek_vl2,
        chat_template="deepseek-vl2",
        capabilities=VISION,
    ),
}


class UnsupportedArchitecture(ValueError):
    pass


def supported_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


def check_architecture(name: str) -> None:
    if name not in ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"architecture {name!r} is not supported; supported: "
            f"{', '.join(supported_architectures())}"
        )


def architecture(name: str) -> Architecture:
    """The row of `name`; UnsupportedArchitecture (listing the supported ones) if none."""
    check_architecture(name)
    return ARCHITECTURES[name]


def first_architecture(hf_config: dict[str, Any]) -> Architecture | None:
    """The row of config.json's first architecture; None for one not in the table."""
    names = hf_config.get("architectures") or [""]
    return ARCHITECTURES.get(str(names[0]))
