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


def make_tokenizer(out_dir: str | os.PathLike[str], vocab_size: int = 400) -> None:
    """A byte-level BPE tokenizer (ids 0..2 are the special tokens) saved to out_dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
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
    fast.chat_template = CHAT_TEMPLATE
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
