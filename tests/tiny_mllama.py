"""A tiny random Llama 3.2 Vision (Mllama) checkpoint built with transformers' own classes, and
the chat template of Llama-3.2-11B-Vision-Instruct (the reference the built-in llama_3_vision
template is tested against).

Text model: 5 layers, cross-attention at 1 and 3 (so 3 self-attention layers take KV slots),
hidden 128, 4 heads / 2 KV heads of 32, llama3 rope; the image token `<|image|>` is id
`vocab_size` (as 128256 is in the real model: a row of the embedding's 8 extra rows, never a
logit). Vision model: width 64, 3 local layers (intermediate outputs of layers 0 and 2) and 2
gated global layers on 28x28 tiles of 14-pixel patches (4 patches + CLS = 5, padded to 8), up
to 4 tiles per image. Every weight, the cross-attention and vision gates included (zero at
init in transformers), is drawn with std 0.2, then the cross-attention gates are set to +-1 so
that images change the output clearly; norm scales are 1 + N(0, 0.2) (near 0 they make the
greedy output one repeated token).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tiny_models import _CORPUS, SPECIAL_TOKENS

MLLAMA_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
)
IMAGE_TOKEN = "<|image|>"
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
TILE = 28

# The chat template of meta-llama/Llama-3.2-11B-Vision-Instruct (chat_template.json),
# reproduced verbatim (less one line's trailing blanks, which the next `{%-` strips anyway):
# images only as {"type": "image"} parts, a system message refused beside images, the dated
# system header on text-only prompts.
LLAMA_3_2_VISION_CHAT_TEMPLATE = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- Find out if there are any images #}
{% set image_ns = namespace(has_images=false) %}
{%- for message in messages %}
    {%- for content in message['content'] %}
        {%- if content['type'] == 'image' %}
            {%- set image_ns.has_images = true %}
        {%- endif %}
    {%- endfor %}
{%- endfor %}

{#- Error out if there are images and system message #}
{%- if image_ns.has_images and not system_message == "" %}
    {{- raise_exception("Prompting with images is incompatible with system messages.") }}
{%- endif %}

{#- System message if there are no images #}
{%- if not image_ns.has_images %}
    {{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
    {%- if tools is not none %}
        {{- "Environment: ipython\\n" }}
    {%- endif %}
    {{- "Cutting Knowledge Date: December 2023\\n" }}
    {{- "Today Date: " + date_string + "\\n\\n" }}
    {%- if tools is not none and not tools_in_user_message %}
        {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
        {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
        {{- "Do not use variables.\\n\\n" }}
        {%- for t in tools %}
            {{- t | tojson(indent=4) }}
            {{- "\\n\\n" }}
        {%- endfor %}
    {%- endif %}
    {{- system_message }}
    {{- "<|eot_id|>" }}
{%- endif %}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
        {%- if message['content'] is string %}
            {{- message['content'] }}
        {%- else %}
            {%- for content in message['content'] %}
                {%- if content['type'] == 'image' %}
                    {{- '<|image|>' }}
                {%- elif content['type'] == 'text' %}
                    {{- content['text'] }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""


def _tokenizer(out: Path) -> dict[str, int]:
    """Byte-level BPE with Llama 3's special tokens (BOS added on encode, as Llama 3's
    tokenizer does) and `<|image|>` added last, so its id is the text vocabulary's size."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = SPECIAL_TOKENS + list(MLLAMA_SPECIAL_TOKENS)
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator([_CORPUS] * 20, trainer=trainer)
    vocab = tok.get_vocab_size()
    tok.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
    ids = {t: tok.token_to_id(t) for t in [*specials, IMAGE_TOKEN]}
    assert ids[IMAGE_TOKEN] == vocab
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, ids[bos])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token="<|eot_id|>",
        pad_token="<|endoftext|>", unk_token=None,
    )  # fmt: skip
    fast.chat_template = LLAMA_3_2_VISION_CHAT_TEMPLATE
    fast.save_pretrained(str(out))
    ids["vocab_size"] = vocab
    return ids


def make_tiny_mllama(out_dir: str | os.PathLike[str], seed: int = 0) -> Path:
    import torch
    import transformers as tf
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = _tokenizer(out)
    eos = [ids["<|end_of_text|>"], ids["<|eot_id|>"]]
    text = dict(
        vocab_size=ids["vocab_size"], hidden_size=128, intermediate_size=256,
        num_hidden_layers=5, cross_attention_layers=[1, 3], num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5,
        rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        },
        bos_token_id=ids["<|begin_of_text|>"], eos_token_id=eos, pad_token_id=0,
    )  # fmt: skip
    vision = dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_global_layers=2,
        attention_heads=4, image_size=TILE, patch_size=14, max_num_tiles=4,
        intermediate_layers_indices=[0, 2], vision_output_dim=64 * 3, norm_eps=1e-5,
    )  # fmt: skip
    config = tf.MllamaConfig(
        text_config=text, vision_config=vision, image_token_index=ids[IMAGE_TOKEN]
    )
    torch.manual_seed(seed)
    model = tf.MllamaForConditionalGeneration(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.2)
            if "norm" in name and name.endswith(".weight"):
                p.add_(1.0)  # norm scales near 1: with ~0 the output is one repeated token
        for i, layer in enumerate(model.model.language_model.layers):
            if hasattr(layer, "cross_attn_attn_gate"):
                layer.cross_attn_attn_gate.fill_(1.0 if i % 2 else -1.0)
                layer.cross_attn_mlp_gate.fill_(-1.0 if i % 2 else 1.0)
    model = model.to(torch.float32)
    model.save_pretrained(str(out), safe_serialization=True)
    MllamaImageProcessorPil(
        size={"height": TILE, "width": TILE}, max_image_tiles=4,
        image_mean=CLIP_MEAN, image_std=CLIP_STD,
    ).save_pretrained(str(out))  # fmt: skip
    tf.GenerationConfig(
        eos_token_id=eos, bos_token_id=ids["<|begin_of_text|>"], pad_token_id=0
    ).save_pretrained(str(out))
    return out


def make_other_layout_mllama(src: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """The checkpoint at `src` (saved as transformers 5.24 and the hub name it:
    `language_model.model.*`, `language_model.lm_head.*`, `vision_model.*`,
    `multi_modal_projector.*`) with the other names and the other config: the v5 module tree
    (`model.language_model.*`, `model.vision_model.*`, `model.multi_modal_projector.*`,
    `lm_head.*`) and the older flat text rope (`rope_theta` + `rope_scaling`) instead of
    `rope_parameters`. Same weights, so the same model."""
    from safetensors.torch import load_file, save_file

    src, out = Path(src), Path(out_dir)
    shutil.copytree(src, out)
    cfg = json.loads((src / "config.json").read_text())
    text = dict(cfg["text_config"])
    rope = dict(text.pop("rope_parameters"))
    text["rope_theta"] = rope.pop("rope_theta")
    text["rope_scaling"] = rope
    cfg["text_config"] = text
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    renames = [
        ("language_model.model.", "model.language_model."),
        ("language_model.lm_head.", "lm_head."),
        ("vision_model.", "model.vision_model."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
    ]
    weights = {}
    for name, tensor in load_file(str(src / "model.safetensors")).items():
        new = next((b + name[len(a) :] for a, b in renames if name.startswith(a)), None)
        if new is None:
            raise ValueError(f"unexpected tensor {name} in the checkpoint")
        weights[new] = tensor
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
