"""Chat templates: resolve `--chat-template` and render OpenAI messages to a prompt string.

`--chat-template` is one of: unset (the tokenizer's own Hugging Face jinja template), a file
(any existing path, or a name ending in .jinja), or a built-in name from `BUILTIN_TEMPLATES`.
A bad value fails at start-up; a model with no template of its own fails only chat requests
(400), so /v1/completions keeps working.
"""

from __future__ import annotations

import os
from typing import Any

import jinja2
import msgspec

from fovea.common.messages import ChatMessage

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Named templates for --chat-template. The vision issue adds the VLM families here.
BUILTIN_TEMPLATES: dict[str, str] = {"chatml": CHATML}

# apply_chat_template arguments that chat_template_kwargs may not override.
_RESERVED_KWARGS = frozenset(
    {"conversation", "messages", "chat_template", "tokenize", "add_generation_prompt"}
)
_IMAGE_PART_TYPES = frozenset({"image_url", "image", "input_image"})


class ChatTemplateError(ValueError):
    """A bad --chat-template value (a start-up error; one line)."""


class ChatRenderError(ValueError):
    """A chat request that cannot be rendered: a 400 naming `param`."""

    def __init__(self, message: str, param: str = "messages") -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def load_chat_template(spec: str | None) -> str | None:
    """The jinja source `spec` names, or None for "the tokenizer's own". Needs no tokenizer, so
    the launcher may call it to fail early."""
    if spec is None:
        return None
    if os.path.isfile(spec):
        with open(spec, encoding="utf-8") as f:
            return f.read()
    if spec.endswith(".jinja"):
        raise ChatTemplateError(f"--chat-template file {spec!r} does not exist")
    if spec in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[spec]
    names = ", ".join(sorted(BUILTIN_TEMPLATES))
    raise ChatTemplateError(
        f"--chat-template {spec!r} is neither a file nor a built-in template (built-in: {names})"
    )


def _flatten_content(content: str | list[dict[str, Any]] | None, accepts_images: bool) -> Any:
    """Text parts join into one string (text-model templates expect a string, as in vLLM);
    image parts stay as parts only for a model that takes images."""
    if content is None or isinstance(content, str):
        return content
    texts: list[str] = []
    for part in content:
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise ChatRenderError("a text content part must carry a string 'text'")
            texts.append(text)
        elif kind in _IMAGE_PART_TYPES:
            if not accepts_images:
                raise ChatRenderError("this model does not accept image inputs")
            return content
        else:
            raise ChatRenderError(f"unsupported content part type {kind!r}")
    return "\n".join(texts)


def messages_to_dicts(
    messages: list[ChatMessage], accepts_images: bool = False
) -> list[dict[str, Any]]:
    """ChatMessage structs as the plain dicts jinja templates index; None fields dropped."""
    out: list[dict[str, Any]] = []
    for m in messages:
        d = {k: v for k, v in msgspec.structs.asdict(m).items() if v is not None}
        if "content" in d:
            d["content"] = _flatten_content(d["content"], accepts_images)
        out.append(d)
    return out


class ChatRenderer:
    """Renders chat requests with one resolved template through the tokenizer's
    `apply_chat_template` (so templates see the tokenizer's special tokens)."""

    def __init__(self, tokenizer: Any, spec: str | None, accepts_images: bool = False) -> None:
        self._tokenizer = tokenizer
        self._accepts_images = accepts_images
        # None: the tokenizer's own template, which may be missing (checked per request).
        self.template = load_chat_template(spec)
        self.available = self.template is not None or bool(
            getattr(tokenizer, "chat_template", None)
        )

    def render(
        self,
        messages: list[ChatMessage],
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> str:
        if not self.available:
            names = ", ".join(sorted(BUILTIN_TEMPLATES))
            raise ChatRenderError(
                "this model has no chat template; start the server with --chat-template "
                f"(a .jinja file or a built-in name: {names}) or use /v1/completions"
            )
        kwargs = dict(chat_template_kwargs or {})
        bad = sorted(_RESERVED_KWARGS & kwargs.keys())
        if bad:
            raise ChatRenderError(
                f"chat_template_kwargs may not set {', '.join(bad)}", "chat_template_kwargs"
            )
        conversation = messages_to_dicts(messages, self._accepts_images)
        try:
            text = self._tokenizer.apply_chat_template(
                conversation,
                chat_template=self.template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                **kwargs,
            )
        except jinja2.TemplateError as e:
            # Templates reject bad conversations with raise_exception (e.g. role order).
            raise ChatRenderError(f"chat template error: {e.message or e}") from e
        except (TypeError, ValueError) as e:
            raise ChatRenderError(f"chat template error: {e}") from e
        if not isinstance(text, str):
            raise TypeError(f"apply_chat_template returned {type(text).__name__}, not str")
        return text
