"""Built-in chat templates, by the names `--chat-template` takes (SGLang's names).

Each renders exactly the prompt format its model family was trained with — the model's own
published template (its Hugging Face processor's), not a look-alike — with one image
placeholder per image part, in message order. The image processor then expands each
placeholder to the image's token count. `vision` says whether a template places images;
a request with images under a template that does not is refused (400), never silently dropped.

The other families' templates (llama_3_vision, gemma-it, minicpmv, deepseek-vl2) are added
here with their models.
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
    "{% set video_count = namespace(value=0) %}"
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
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Gemma 3 instruction-tuned (the chat_template of gemma-3-*-it): one `<bos>`, turns
# `<start_of_turn>{user|model}\n...<end_of_turn>\n`, a system message folded into the first
# user turn followed by a blank line, every text part trimmed, `<start_of_image>` per image
# part (OpenAI `image_url` parts too; the original knows only `image`), roles must alternate.
GEMMA_IT = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] in ('image', 'image_url', 'input_image') -%}"
    "{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}"
    "{{ item['text'] | trim }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- else -%}"
    "{{ raise_exception('Invalid content type') }}"
    "{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<start_of_turn>model\n' }}"
    "{%- endif -%}"
)

# The LLaVA templates render what SGLang's conversation templates of the same names render
# (FastChat-style, from LLaVA's conversation.py): the last system message replaces the default
# one; a user turn is its parts in order, each image `<image>\n`, text as is; `bos_token`
# first, since Fovea tokenizes the rendered text without special tokens (Qwen has none).


def _llava_template(head: str, turn: str, blank: str, system: str) -> str:
    """jinja for a LLaVA conversation: `head` renders ns.system, `turn` a turn of `role` with
    non-empty `text`, `blank` a turn with empty text; roles are (user, assistant) names."""
    return (
        "{%- set ns = namespace(system=" + repr(system) + ", text='') -%}"
        "{%- for m in messages if m['role'] == 'system' -%}"
        "{%- set ns.system = m['content'] or '' -%}"
        "{%- endfor -%}"
        "{%- if bos_token -%}{{ bos_token }}{%- endif -%}"
        + head
        + "{%- for m in messages if m['role'] != 'system' -%}"
        "{%- if m['role'] not in ('user', 'assistant') -%}"
        "{{ raise_exception('this template takes system, user and assistant messages only') }}"
        "{%- endif -%}"
        "{%- set role = roles[0] if m['role'] == 'user' else roles[1] -%}"
        "{%- if m['content'] is string or m['content'] is none -%}"
        "{%- set ns.text = m['content'] or '' -%}"
        "{%- else -%}"
        "{%- set ns.text = '' -%}"
        "{%- for p in m['content'] -%}"
        "{%- if p['type'] in ('image_url', 'image', 'input_image') -%}"
        "{%- set ns.text = ns.text + '<image>\\n' -%}"
        "{%- elif p['type'] == 'video' -%}"
        "{%- set ns.text = ns.text + '<video>\\n' -%}"
        "{%- elif p['type'] == 'text' -%}"
        "{%- set ns.text = ns.text + p['text'] -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- endif -%}"
        "{%- set text = ns.text -%}"
        "{%- if text -%}" + turn + "{%- else -%}" + blank + "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{%- set role = roles[1] -%}" + blank + "{%- endif -%}"
    )


# vicuna_v1.1 (LLaVA-1.5 / 1.6): "{system} USER: {text} ASSISTANT: {text}</s>USER: ...",
# separators alternating " " and "</s>" by turn; the open turn is "ASSISTANT:".
VICUNA_V1_1 = "{%- set roles = ('USER', 'ASSISTANT') -%}" + _llava_template(
    head="{{ ns.system + ' ' }}",
    turn="{{ role + ': ' + text + (' ' if loop.index0 % 2 == 0 else '</s>') }}",
    blank="{{ role + ':' }}",
    system=(
        "A chat between a curious user and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the user's questions."
    ),
)

# chatml-llava (LLaVA-OneVision, Qwen-based LLaVA-NeXT): ChatML, the system turn always there.
CHATML_LLAVA = "{%- set roles = ('<|im_start|>user', '<|im_start|>assistant') -%}" + (
    _llava_template(
        head="{{ '<|im_start|>system\\n' + ns.system + '<|im_end|>\\n' }}",
        turn="{{ role + '\\n' + text + '<|im_end|>\\n' }}",
        blank="{{ role + '\\n' }}",
        system="You are a helpful assistant.",
    )
)

# llava_llama_3 (Llama3-LLaVA-NeXT): Llama 3 headers, each turn's text stripped, no system
# turn when the system message is empty.
LLAVA_LLAMA_3 = "{%- set roles = ('user', 'assistant') -%}" + _llava_template(
    head=(
        "{%- if ns.system -%}"
        "{{ '<|start_header_id|>system<|end_header_id|>\\n\\n' + ns.system + '<|eot_id|>' }}"
        "{%- endif -%}"
    ),
    turn=(
        "{{ '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' + text | trim"
        " + '<|eot_id|>' }}"
    ),
    blank="{{ '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' }}",
    system=(
        "You are a helpful language and vision assistant. You are able to understand the "
        "visual content that the user provides, and assist the user with a variety of tasks "
        "using natural language."
    ),
)

# deepseek-vl2: DeepSeek-VL2's conversation template "deepseek" (its conversation.py, as
# SGLang's deepseek-vl2): "{system}\n\n" when there is one, user turns "<|User|>: {text}\n\n",
# assistant turns "<|Assistant|>: {text}<｜end▁of▁sentence｜>", a turn with no text "{role}:",
# the open turn "<|Assistant|>:"; each turn's text stripped, the prompt stripped, then
# `bos_token` (the processor's BOS). Images go "<image>\n" each before their turn's text.
DEEPSEEK_VL2 = (
    "{%- set ns = namespace(system='', out='', text='', images='') -%}"
    "{%- for m in messages -%}"
    "{%- set ns.text = '' -%}{%- set ns.images = '' -%}"
    "{%- if m['content'] is string or m['content'] is none -%}"
    "{%- set ns.text = m['content'] or '' -%}"
    "{%- else -%}"
    "{%- for p in m['content'] -%}"
    "{%- if p['type'] in ('image_url', 'image', 'input_image') -%}"
    "{%- if m['role'] != 'user' -%}"
    "{{ raise_exception('deepseek-vl2 takes images in user messages only') }}"
    "{%- endif -%}"
    "{%- set ns.images = ns.images + '<image>\n' -%}"
    "{%- elif p['type'] == 'text' -%}"
    "{%- set ns.text = ns.text + p['text'] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- set text = (ns.images + ns.text) | trim -%}"
    "{%- if m['role'] == 'system' -%}"
    "{%- set ns.system = ns.text -%}"
    "{%- elif m['role'] in ('user', 'assistant') -%}"
    "{%- set role = '<|User|>' if m['role'] == 'user' else '<|Assistant|>' -%}"
    "{%- set sep = '\n\n' if m['role'] == 'user' else '<｜end▁of▁sentence｜>' -%}"
    "{%- set ns.out = ns.out + (role + ': ' + text + sep if text else role + ':') -%}"
    "{%- else -%}"
    "{{ raise_exception('deepseek-vl2 takes system, user and assistant messages only') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{%- set ns.out = ns.out + '<|Assistant|>:' -%}{%- endif -%}"
    "{%- if ns.system -%}{%- set ns.out = ns.system + '\n\n' + ns.out -%}{%- endif -%}"
    "{{- (bos_token or '') + ns.out | trim -}}"
)

# minicpmv (MiniCPM-V 2.6): what the model's chat() renders through its tokenizer's template,
# Qwen2's ChatML with its default system turn when the first message is not a system one.
# chat() turns a message's parts into one string joined by "\n", each image as
# `(<image>./</image>)`, which the processor replaces by the image's slices; here a turn's
# images come first, then its text parts (the model card's order).
MINICPMV = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{%- endif -%}"
    "{%- if message['content'] is string or message['content'] is none -%}"
    "{%- set text = message['content'] or '' -%}"
    "{%- else -%}"
    "{%- set ns = namespace(images=[], texts=[]) -%}"
    "{%- for p in message['content'] -%}"
    "{%- if p['type'] in ('image_url', 'image', 'input_image') -%}"
    "{%- set ns.images = ns.images + ['(<image>./</image>)'] -%}"
    "{%- elif p['type'] == 'text' -%}"
    "{%- set ns.texts = ns.texts + [p['text']] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set text = (ns.images + ns.texts) | join('\n') -%}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + text + '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

# llama_3_vision: the chat template of Llama-3.2-11B-Vision-Instruct (its chat_template.json),
# verbatim but for the image test, which also takes OpenAI's `image_url` / `input_image` parts:
# `<|begin_of_text|>`, `<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>`,
# `<|image|>` where each image part is, text parts as they are. A prompt without images gets
# the dated system turn ("Cutting Knowledge Date: December 2023", "Today Date: " from
# `date_string` or today), the system message inside it; a system message beside images is
# refused (as the model's own template does).
LLAMA_3_VISION = """{{- bos_token }}
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
        {%- if content['type'] in ('image', 'image_url', 'input_image') %}
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
                {%- if content['type'] in ('image', 'image_url', 'input_image') %}
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

BUILTIN_TEMPLATES: dict[str, BuiltinTemplate] = {
    "chatml": BuiltinTemplate(CHATML, vision=False),
    "qwen2-vl": BuiltinTemplate(QWEN2_VL, vision=True),
    "gemma-it": BuiltinTemplate(GEMMA_IT, vision=True),
    "vicuna_v1.1": BuiltinTemplate(VICUNA_V1_1, vision=True),
    "chatml-llava": BuiltinTemplate(CHATML_LLAVA, vision=True),
    "llava_llama_3": BuiltinTemplate(LLAVA_LLAMA_3, vision=True),
    "llama_3_vision": BuiltinTemplate(LLAMA_3_VISION, vision=True),
    "minicpmv": BuiltinTemplate(MINICPMV, vision=True),
    "deepseek-vl2": BuiltinTemplate(DEEPSEEK_VL2, vision=True),
}
