"""Built-in chat templates, by the names `--chat-template` takes (SGLang's names).

Each renders exactly the prompt format its model family was trained with — the model's own
published template (its Hugging Face processor's), not a look-alike — with one image
placeholder per image part, in message order. The image processor then expands each
placeholder to the image's token count. `vision` says whether a template places images;
a request with images under a template that does not is refused (400), never silently dropped.

The other families' templates (llama_3_vision, gemma-it, minicpmv, deepseek-vl2, chatml-llava,
llava_llama_3, vicuna_v1.1) are added here with their models.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BuiltinTemplate:
    source: str  # jinja
    vision: bool


CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Qwen2-VL / Qwen2.5-VL processor template: a default system turn when the first message is
# not a system one; text parts concatenate with no separator; `add_vision_id` (a
# chat_template_kwargs variable) prefixes "Picture k: ".
QWEN2_VL = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

BUILTIN_TEMPLATES: dict[str, BuiltinTemplate] = {
    "chatml": BuiltinTemplate(CHATML, vision=False),
    "qwen2-vl": BuiltinTemplate(QWEN2_VL, vision=True),
}
