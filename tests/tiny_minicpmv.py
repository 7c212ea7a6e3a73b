"""Tiny random MiniCPM-V checkpoints in both layouts Fovea serves.

- make_tiny_minicpmv: the 2.6 layout as the hub publishes it (remote code, so no transformers
  class saves it): config.json (architectures MiniCPMV, version 2.6, Qwen2 fields at the top
  level, vision_config, query_num), model.safetensors with `llm.*` (a Qwen2ForCausalLM),
  `vpm.*` (a SiglipVisionModel) and `resampler.*` (the plain resampler of
  tests/minicpmv_reference.py), preprocessor_config.json with the published keys, and a Qwen2
  ChatML tokenizer holding MiniCPM-V's marker tokens. Decoder width 256 (the resampler has
  256 // 128 = 2 heads); a 2-layer SigLIP of width 64 whose position table is 10x10 patches
  of 14 while views are at most 8x8 (scale_resolution 112), so positions are bucketed;
  16 queries per view.
- make_tiny_minicpmv4_6: transformers' MiniCPMV4_6ForConditionalGeneration with a qwen2
  text_config (Fovea serves no Qwen3.5), a 3-layer SigLIP of width 64 (10x10 position table),
  the ViT merger after layer 1, 16x downsampling, scale_resolution 224 (a 224x224 view is
  16x16 patches -> 16 tokens); transformers' PIL image processor; a ChatML template that
  renders `<|image_pad|>` then "\\n" per image part, saved as chat_template.jinja too.

Weights use std 0.2 as in tiny_models.py; the resampler's and mergers' layernorms too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tiny_models import _CORPUS, SPECIAL_TOKENS

MINICPMV_SPECIAL = (
    "<unk>", "<image>", "</image>", "<slice>", "</slice>", "<image_id>", "</image_id>",
    "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip
# Ids of the tiny tokenizers' special tokens: SPECIAL_TOKENS, then MINICPMV_SPECIAL.
TOKEN_IDS = {t: i for i, t in enumerate(SPECIAL_TOKENS + list(MINICPMV_SPECIAL))}

# Qwen2-7B-Instruct's template, which MiniCPM-V 2.6's tokenizer carries.
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The 4.6 fixture's template: ChatML, each image part `<|image_pad|>\n`, text parts as they are.
MINICPMV4_6_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for p in m['content'] %}"
    "{% if p['type'] in ('image', 'image_url') %}<|image_pad|>\n"
    "{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

QWEN2_TEXT = dict(
    vocab_size=512, hidden_size=256, intermediate_size=384, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
    rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False,
    eos_token_id=TOKEN_IDS["<|im_end|>"], bos_token_id=None, pad_token_id=0,
)  # fmt: skip


def _tokenizer(out: Path, chat_template: str, extra: dict[str, str] | None = None) -> None:
    """A byte-level BPE with ChatML and MiniCPM-V's special tokens (ids in TOKEN_IDS); no
    BOS on encode, as Qwen2's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS + list(MINICPMV_SPECIAL),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([_CORPUS + "Compare these.\nDescribe it.\n"] * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
        pad_token="<|endoftext|>", unk_token="<unk>", extra_special_tokens=extra or {},
    )  # fmt: skip
    fast.chat_template = chat_template
    fast.save_pretrained(str(out))


def _randomize(model: object, seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # type: ignore[attr-defined]
            p.normal_(0.0, 0.2)


def make_tiny_minicpmv(out_dir: str | os.PathLike[str], seed: int = 0) -> Path:
    """The 2.6 layout; see the module docstring."""
    import torch
    from minicpmv_reference import Resampler
    from safetensors.torch import save_file
    from transformers import (
        GenerationConfig,
        Qwen2Config,
        Qwen2ForCausalLM,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _tokenizer(out, QWEN2_CHAT_TEMPLATE)
    vision = dict(
        model_type="siglip", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, image_size=140, patch_size=14, vision_use_head=False,
    )  # fmt: skip
    llm = Qwen2ForCausalLM(Qwen2Config(**QWEN2_TEXT))
    vpm = SiglipVisionModel(SiglipVisionConfig(**vision))
    resampler = Resampler(16, 256, 2, 64)
    _randomize(llm, seed)
    _randomize(vpm, seed + 1)
    _randomize(resampler, seed + 2)
    weights = {f"llm.{k}": v for k, v in llm.state_dict().items()}
    weights |= {f"vpm.{k}": v for k, v in vpm.state_dict().items()}
    weights |= {f"resampler.{k}": v for k, v in resampler.state_dict().items()}
    weights = {k: v.to(torch.float32).contiguous() for k, v in weights.items()}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["MiniCPMV"], "model_type": "minicpmv", "version": 2.6,
        **{k: v for k, v in QWEN2_TEXT.items()}, "hidden_act": "silu",
        "query_num": 16, "image_size": 112, "drop_vision_last_layer": False,
        "slice_mode": True, "use_image_id": True, "batch_vision_input": True,
        "slice_config": {"max_slice_nums": 9, "patch_size": 14, "model_type": "minicpmv"},
        "vision_config": vision,
    }  # fmt: skip
    (out / "config.json").write_text(json.dumps(config, indent=2))
    preprocessor = {
        "image_processor_type": "MiniCPMVImageProcessor", "auto_map": {},
        "max_slice_nums": 9, "scale_resolution": 112, "patch_size": 14, "use_image_id": True,
        "image_feature_size": 16, "im_start": "<image>", "im_end": "</image>",
        "slice_start": "<slice>", "slice_end": "</slice>", "unk": "<unk>",
        "im_id_start": "<image_id>", "im_id_end": "</image_id>", "slice_mode": True,
        "norm_mean": [0.5, 0.5, 0.5], "norm_std": [0.5, 0.5, 0.5], "version": 2.6,
    }  # fmt: skip
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    eos = TOKEN_IDS["<|im_end|>"]
    GenerationConfig(
        eos_token_id=[eos, TOKEN_IDS["<|endoftext|>"]], pad_token_id=0
    ).save_pretrained(str(out))
    return out


def make_tiny_minicpmv4_6(out_dir: str | os.PathLike[str], seed: int = 0) -> Path:
    """The native 4.6 layout; see the module docstring."""
    import torch
    from transformers import (
        GenerationConfig,
        MiniCPMV4_6Config,
        MiniCPMV4_6ForConditionalGeneration,
    )
    from transformers.models.minicpmv4_6.image_processing_pil_minicpmv4_6 import (
        MiniCPMV4_6ImageProcessorPil,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    extra = {
        "image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
        "image_start_token": "<image>", "image_end_token": "</image>",
        "slice_start_token": "<slice>", "slice_end_token": "</slice>",
        "image_id_start_token": "<image_id>", "image_id_end_token": "</image_id>",
    }  # fmt: skip
    _tokenizer(out, MINICPMV4_6_CHAT_TEMPLATE, extra)
    text = {**QWEN2_TEXT, "model_type": "qwen2", "hidden_size": 128, "intermediate_size": 256}
    vision = dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        image_size=140, patch_size=14,
    )  # fmt: skip
    config = MiniCPMV4_6Config(
        text_config=text, vision_config=vision, insert_layer_id=1,
        image_token_id=TOKEN_IDS["<|image_pad|>"], video_token_id=TOKEN_IDS["<|video_pad|>"],
        tie_word_embeddings=False,
    )  # fmt: skip
    model = MiniCPMV4_6ForConditionalGeneration(config)
    _randomize(model, seed)
    model.to(torch.float32).save_pretrained(str(out), safe_serialization=True)
    MiniCPMV4_6ImageProcessorPil(scale_resolution=224, max_slice_nums=9).save_pretrained(str(out))
    eos = TOKEN_IDS["<|im_end|>"]
    GenerationConfig(eos_token_id=[eos], pad_token_id=0).save_pretrained(str(out))
    return out
