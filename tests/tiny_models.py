"""Tiny random checkpoints built with transformers' own classes, saved as a user would have them
(config, safetensors, tokenizer with a chat template, generation config).

Weights use std 0.2 (not 0.02): with small init greedy outputs tie and comparisons get fragile.
"""

from __future__ import annotations

import os
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for p in m['content'] %}{{ p['text'] }}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = (
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France. "
    "Numbers like 12345 and 67890 appear in text. Héllo wörld, naïve café, 日本語のテキスト, "
    "emoji 🙂 and symbols #@$%^&*(). Serving models fast needs batching and caching. "
    "def main():\n    return 42\n"
)


def make_tokenizer(
    out_dir: str | os.PathLike[str],
    vocab_size: int = 400,
    extra_special: tuple[str, ...] = (),
    chat_template: str = CHAT_TEMPLATE,
) -> None:
    """A byte-level BPE tokenizer (ids 0..2 are the special tokens, then `extra_special` in
    order) saved to out_dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + list(extra_special),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([_CORPUS] * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    fast.chat_template = chat_template
    fast.save_pretrained(str(out_dir))


def make_tiny_model(kind: str, out_dir: str | os.PathLike[str], seed: int = 0) -> Path:
    """kind: 'llama' or 'qwen2'. Returns the directory."""
    import torch
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    make_tokenizer(out)
    common = dict(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model: torch.nn.Module
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(rope_theta=10000.0, **common))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(rope_theta=1000000.0, **common))
    else:
        raise ValueError(kind)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model = model.to(torch.float32)
    model.save_pretrained(str(out), safe_serialization=True)
    GenerationConfig(eos_token_id=2, bos_token_id=0, pad_token_id=0).save_pretrained(str(out))
    return out


# Qwen2-VL's placeholders; the tokenizer gives them ids 3..6.
VL_SPECIAL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")

# Qwen2-VL's processor template, less the default system turn: one placeholder per image part.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' or 'image' in p or 'image_url' in p %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in p %}{{ p['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tiny_qwen2_vl(
    out_dir: str | os.PathLike[str], version: str = "qwen2_vl", seed: int = 0
) -> Path:
    """version: 'qwen2_vl' or 'qwen2_5_vl'. Decoder as make_tiny_model's (head_dim 32, M-RoPE
    sections [4, 6, 6]); a 2-block ViT of width 64; an image processor capped at 64 merged
    tokens per image. Qwen2.5-VL: block 1 full attention, block 0 in windows of 56 px (2x2
    merged patches), so an 8x8-patch image splits into 4 windows."""
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    make_tokenizer(out, extra_special=VL_SPECIAL_TOKENS, chat_template=QWEN2_VL_CHAT_TEMPLATE)
    start, end, image_pad, video_pad = range(3, 3 + len(VL_SPECIAL_TOKENS))
    text = dict(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]},
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=0,
    )
    ids = dict(
        image_token_id=image_pad,
        video_token_id=video_pad,
        vision_start_token_id=start,
        vision_end_token_id=end,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model: torch.nn.Module
    if version == "qwen2_vl":
        vision = dict(depth=2, embed_dim=64, hidden_size=128, num_heads=4, mlp_ratio=2)
        model = Qwen2VLForConditionalGeneration(
            Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
        )
    elif version == "qwen2_5_vl":
        vision = dict(
            depth=2,
            hidden_size=64,
            out_hidden_size=128,
            num_heads=4,
            intermediate_size=96,
            window_size=56,
            fullatt_block_indexes=[1],
        )
        model = Qwen2_5_VLForConditionalGeneration(
            Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
        )
    else:
        raise ValueError(version)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model = model.to(torch.float32)
    model.save_pretrained(str(out), safe_serialization=True)
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 64).save_pretrained(str(out))
    GenerationConfig(eos_token_id=2, bos_token_id=0, pad_token_id=0).save_pretrained(str(out))
    return out
