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


# Gemma 3's special tokens; the tokenizer gives them ids 3..9.
GEMMA3_SPECIAL_TOKENS = (
    "<bos>",
    "<eos>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
)

# The chat_template of gemma-3-*-it, verbatim (transformers' convert_gemma3_weights.py).
GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""


def make_tiny_gemma3(
    out_dir: str | os.PathLike[str], seed: int = 0, text_only: bool = False
) -> Path:
    """Gemma 3: 3 decoder layers (sliding, full, sliding; window 24 tokens; head_dim 32,
    query_pre_attn_scalar 24; global rope linearly scaled x8), tied embeddings. The vision
    model: a 2-layer SigLIP of width 64 on 64x64 images (8x8 patches) pooled to 16 tokens per
    image, projection non-zero. text_only: Gemma3ForCausalLM with an untied head and
    final_logit_softcapping 20. The tokenizer learns newline runs ("\\n\\n" is one token), as
    Gemma's has them, so the processor's blank lines around an image merge with neighbours."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        Gemma3Config,
        Gemma3ForCausalLM,
        Gemma3ForConditionalGeneration,
        Gemma3TextConfig,
        GenerationConfig,
        PreTrainedTokenizerFast,
    )
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS + list(GEMMA3_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = _CORPUS + "One.\n\nTwo.\n\n\nThree.\n\n\n\nFour.\n\n\n\n\n\n"
    tok.train_from_iterator([corpus] * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<|endoftext|>",
        unk_token=None,
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
    )
    fast.chat_template = GEMMA3_CHAT_TEMPLATE
    fast.save_pretrained(str(out))
    bos, eos, _, end_of_turn, boi, eoi, soft = range(3, 3 + len(GEMMA3_SPECIAL_TOKENS))
    text = dict(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        query_pre_attn_scalar=24,
        sliding_window=24,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model: torch.nn.Module
    if text_only:
        cfg = Gemma3TextConfig(**text, final_logit_softcapping=20.0, tie_word_embeddings=False)
        model = Gemma3ForCausalLM(cfg)
    else:
        vision = dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=64,
            patch_size=8,
            vision_use_head=False,
        )
        model = Gemma3ForConditionalGeneration(
            Gemma3Config(
                text_config=text,
                vision_config=vision,
                mm_tokens_per_image=16,
                boi_token_index=boi,
                eoi_token_index=eoi,
                image_token_index=soft,
                tie_word_embeddings=True,
            )
        )
        Gemma3ImageProcessorPil(size={"height": 64, "width": 64}).save_pretrained(str(out))
    with torch.no_grad():
        for p in model.parameters():  # the projection, zero at init, included
            p.normal_(0.0, 0.2)
    model = model.to(torch.float32)
    model.save_pretrained(str(out), safe_serialization=True)
    GenerationConfig(
        eos_token_id=[eos, end_of_turn], bos_token_id=bos, pad_token_id=0
    ).save_pretrained(str(out))
    return out


# LLaVA tokenizers' special tokens (ids from 3, after SPECIAL_TOKENS), by language model.
LLAVA_SPECIAL_TOKENS = {
    "vicuna": ("<s>", "</s>", "<image>"),
    "llama3": (
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
        "<image>",
    ),
    "qwen2": ("<image>", "<video>"),
}
# kind -> (tokenizer style, built-in chat template)
LLAVA_KINDS = {
    "llava": ("vicuna", "vicuna_v1.1"),
    "llava_next": ("vicuna", "vicuna_v1.1"),
    "llama3_llava_next": ("llama3", "llava_llama_3"),
    "llava_onevision": ("qwen2", "chatml-llava"),
}


def _llava_tokenizer(out: Path, style: str, chat_template: str) -> dict[str, int]:
    """A byte-level BPE whose special tokens are the style's; Llama styles add BOS on encode
    (as Llama tokenizers do), Qwen's none. Returns the special tokens' ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    extra = LLAVA_SPECIAL_TOKENS[style]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS + list(extra),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([_CORPUS] * 20, trainer=trainer)
    ids = {t: i for i, t in enumerate(SPECIAL_TOKENS + list(extra))}
    bos, eos = {"vicuna": ("<s>", "</s>"), "llama3": ("<|begin_of_text|>", "<|eot_id|>")}.get(
        style, (None, "<|im_end|>")
    )
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, ids[bos])]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token="<|endoftext|>",
        unk_token=None,
    )  # fmt: skip
    fast.chat_template = chat_template
    fast.save_pretrained(str(out))
    return ids


def make_tiny_llava(out_dir: str | os.PathLike[str], kind: str, seed: int = 0) -> Path:
    """kind: 'llava' (LLaVA-1.5), 'llava_next', 'llama3_llava_next' (llava_next on a Llama-3
    tokenizer) or 'llava_onevision'. Decoder as make_tiny_model's (Llama; Qwen2 for OneVision);
    the tower a 3-layer CLIP (LLaVA features from layer 2, CLS dropped) or SigLIP (OneVision:
    the last layer, all patches) of width 64 on 56x56 images (4x4 patches of 14). NeXT tiles
    at pinpoints of 56-pixel tiles, OneVision up to 3x3 tiles as anyres_max_4 (downscaling
    beyond 4 tiles' worth). LLaVA-1.5's image processor pads square (as the original does)."""
    import torch
    import transformers as tf
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil,
    )
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    from fovea.tokenizer_service.builtin_templates import BUILTIN_TEMPLATES

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    style, template = LLAVA_KINDS[kind]
    ids = _llava_tokenizer(out, style, BUILTIN_TEMPLATES[template].source)
    if style == "vicuna":
        bos, eos = ids["<s>"], [ids["</s>"]]
    elif style == "llama3":
        bos, eos = ids["<|begin_of_text|>"], [ids["<|end_of_text|>"], ids["<|eot_id|>"]]
    else:
        bos, eos = None, [ids["<|im_end|>"]]
    text: dict[str, object] = dict(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        rms_norm_eps=1e-6, bos_token_id=bos, eos_token_id=eos[-1], pad_token_id=0,
        tie_word_embeddings=False,
    )  # fmt: skip
    clip = dict(
        model_type="clip_vision_model", hidden_size=64, intermediate_size=128,
        num_hidden_layers=3, num_attention_heads=4, image_size=56, patch_size=14,
        hidden_act="quick_gelu",
    )  # fmt: skip
    common = dict(image_token_index=ids["<image>"], vision_feature_select_strategy="default")
    next_pins = [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]
    torch.manual_seed(seed)
    model: torch.nn.Module
    processor: object
    if kind == "llava":
        text.update(model_type="llama", rope_theta=10000.0)
        model = tf.LlavaForConditionalGeneration(
            tf.LlavaConfig(text_config=text, vision_config=clip, image_seq_length=16, **common)
        )
        crop = {"height": 56, "width": 56}
        processor = LlavaImageProcessorPil(size={"shortest_edge": 56}, crop_size=crop, do_pad=True)
    elif kind in ("llava_next", "llama3_llava_next"):
        text.update(model_type="llama", rope_theta=10000.0 if style == "vicuna" else 500000.0)
        cfg = tf.LlavaNextConfig(
            text_config=text, vision_config=clip, image_grid_pinpoints=next_pins, **common
        )
        model = tf.LlavaNextForConditionalGeneration(cfg)
        processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
            image_grid_pinpoints=next_pins,
        )  # fmt: skip
    elif kind == "llava_onevision":
        text.update(model_type="qwen2", rope_theta=1e6)
        siglip = dict(
            model_type="siglip_vision_model", hidden_size=64, intermediate_size=96,
            num_hidden_layers=3, num_attention_heads=4, image_size=56, patch_size=14,
            vision_use_head=False,
        )  # fmt: skip
        pins = [[h, w] for h in (56, 112, 168) for w in (56, 112, 168)]
        cfg = tf.LlavaOnevisionConfig(
            text_config=text, vision_config=siglip, image_token_index=ids["<image>"],
            video_token_index=ids["<video>"], vision_feature_layer=-1,
            vision_feature_select_strategy="full", image_grid_pinpoints=pins,
            vision_aspect_ratio="anyres_max_4",
        )  # fmt: skip
        model = tf.LlavaOnevisionForConditionalGeneration(cfg)
        processor = LlavaOnevisionImageProcessorPil(
            size={"height": 56, "width": 56}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
            image_grid_pinpoints=pins,
        )  # fmt: skip
    else:
        raise ValueError(kind)
    with torch.no_grad():
        for p in model.parameters():  # image_newline and the projector included
            p.normal_(0.0, 0.2)
    model = model.to(torch.float32)
    model.save_pretrained(str(out), safe_serialization=True)
    processor.save_pretrained(str(out))  # type: ignore[attr-defined]
    tf.GenerationConfig(eos_token_id=eos, bos_token_id=bos, pad_token_id=0).save_pretrained(
        str(out)
    )
    return out


def make_original_llava(src: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """The checkpoint of make_tiny_llava at `src` in the original LLaVA layout (liuhaotian /
    lmms-lab): a flat LlavaLlamaForCausalLM / LlavaQwenForCausalLM config with mm_* keys and
    the hub tower's name, the same weights renamed (`model.*`, `lm_head`,
    `model.vision_tower.vision_tower.vision_model.*`, `model.mm_projector.{0,2}`,
    `model.image_newline`), no preprocessor_config.json, no image_token_index. The tiny tower
    goes in `mm_vision_tower_config` (Fovea's escape hatch); a SigLIP tower one layer deeper,
    as the original drops its last layer."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    src, out = Path(src), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name not in ("config.json", "model.safetensors", "preprocessor_config.json"):
            shutil.copy(f, out / f.name)
    cfg = json.loads((src / "config.json").read_text())
    text, vision = dict(cfg["text_config"]), dict(cfg["vision_config"])
    qwen = text["model_type"] == "qwen2"
    flat = {k: v for k, v in text.items() if k not in ("model_type", "architectures")}
    if qwen:
        vision["num_hidden_layers"] += 1
    anyres = cfg["model_type"] != "llava"
    aspect = cfg.get("vision_aspect_ratio", "anyres") if anyres else "pad"
    flat.update(
        architectures=["LlavaQwenForCausalLM" if qwen else "LlavaLlamaForCausalLM"],
        model_type="llava_qwen" if qwen else "llava",
        mm_vision_tower=(
            "google/siglip-so400m-patch14-384" if qwen else "openai/clip-vit-large-patch14-336"
        ),
        mm_vision_tower_config=vision,
        mm_projector_type="mlp2x_gelu",
        mm_hidden_size=vision["hidden_size"],
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        mm_patch_merge_type="spatial_unpad" if anyres else "flat",
        image_aspect_ratio=aspect,
    )
    if anyres:
        flat["image_grid_pinpoints"] = cfg["image_grid_pinpoints"]
    (out / "config.json").write_text(json.dumps(flat, indent=2))
    renames = [
        ("language_model.model.", "model."),
        ("language_model.lm_head.", "lm_head."),
        ("vision_tower.", "model.vision_tower.vision_tower.vision_model."),
        ("multi_modal_projector.linear_1.", "model.mm_projector.0."),
        ("multi_modal_projector.linear_2.", "model.mm_projector.2."),
        ("image_newline", "model.image_newline"),
    ]
    weights = load_file(str(src / "model.safetensors"))
    renamed = {}
    for name, tensor in weights.items():
        new = next(dst + name[len(s) :] for s, dst in renames if name.startswith(s))
        renamed[new] = tensor
    save_file(renamed, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
