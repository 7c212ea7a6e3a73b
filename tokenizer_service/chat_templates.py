"""Chat templates: resolve `--chat-template` and render OpenAI messages to a prompt string.

`--chat-template` is one of: unset (the tokenizer's own Hugging Face jinja template), a file
(any existing path, or a name ending in .jinja), or a built-in name from `BUILTIN_TEMPLATES`.
A bad value fails at start-up; a model with no template of its own fails only chat requests
(400), so /v1/completions keeps working.

Images pass only when the model takes images and the template places them: a vision built-in
or a user's file. The tokenizer's own template is text-only (as in SGLang), so an image part
under it is a 400 that names the template to use.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jinja2
import msgspec

from fovea.common.messages import ChatMessage, ImageRef, VideoRef
from fovea.tokenizer_service.builtin_templates import BUILTIN_TEMPLATES

# apply_chat_template arguments that chat_template_kwargs may not override.
_RESERVED_KWARGS = frozenset(
    {
        "conversation",
        "messages",
        "chat_template",
        "tokenize",
        "add_generation_prompt",
        "continue_final_message",
        "tools",
    }
)
_IMAGE_PART_TYPES = frozenset({"image_url", "image", "input_image"})
_VIDEO_PART_TYPES = frozenset({"video_url", "video"})
# Sampling fields a video part may carry (in its video_url object or beside it).
VIDEO_FIELDS = ("fps", "max_frames", "min_pixels", "max_pixels")


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
        return BUILTIN_TEMPLATES[spec].source
    names = ", ".join(sorted(BUILTIN_TEMPLATES))
    raise ChatTemplateError(
        f"--chat-template {spec!r} is neither a file nor a built-in template (built-in: {names})"
    )


def template_text(spec: str | None, tokenizer_dir: str) -> str | None:
    """The jinja source chat requests render with: `spec`'s, else the tokenizer directory's
    own (chat_template.jinja, chat_template.json, or tokenizer_config.json; named templates
    such as "tool_use" joined). Read from the files, so the launcher needs no tokenizer."""
    if spec is not None:
        return load_chat_template(spec)
    jinja = os.path.join(tokenizer_dir, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    for name in ("chat_template.json", "tokenizer_config.json"):
        try:
            with open(os.path.join(tokenizer_dir, name), encoding="utf-8") as f:
                found = json.load(f).get("chat_template")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(found, list):  # [{"name": ..., "template": ...}, ...]
            found = "\n".join(str(t.get("template", "")) for t in found if isinstance(t, dict))
        if isinstance(found, str) and found:
            return found
    return None


def template_places_images(spec: str | None) -> bool:
    if spec is None:
        return False
    builtin = BUILTIN_TEMPLATES.get(spec)
    return builtin.vision if builtin is not None else True


def own_template_places(tokenizer: Any, image_token: str) -> bool:
    """Whether the tokenizer's own chat template renders one OpenAI image part as exactly one
    `image_token` (a template that ignores the part, or fails on it, does not)."""
    if not getattr(tokenizer, "chat_template", None):
        return False
    probe = [
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "probe"}}, {"type": "text", "text": "?"},
        ]},
    ]  # fmt: skip
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    except Exception:  # any template error: it cannot be trusted with images
        return False
    return isinstance(text, str) and text.count(image_token) == 1


def _image_url(part: dict[str, Any]) -> str:
    url = part.get("image_url")
    if isinstance(url, dict):
        url = url.get("url")
    if not isinstance(url, str) or not url:
        raise ChatRenderError("an image_url content part must carry image_url.url")
    return url


def _is_frame(part: dict[str, Any]) -> bool:
    """An image part that is a frame of a video (SGLang's "modalities": "video")."""
    return part.get("type") in _IMAGE_PART_TYPES and part.get("modalities") == "video"


def image_refs(messages: list[ChatMessage]) -> list[ImageRef]:
    """The images of a chat request in the order a template places them (message order)."""
    return [
        ImageRef(url=_image_url(part))
        for m in messages
        if isinstance(m.content, list)
        for part in m.content
        if part.get("type") in _IMAGE_PART_TYPES and not _is_frame(part)
    ]


def _video_url(part: dict[str, Any]) -> str:
    url = part.get("video_url", part.get("video"))
    if isinstance(url, dict):
        url = url.get("url")
    if not isinstance(url, str) or not url:
        raise ChatRenderError("a video_url content part must carry video_url.url")
    return url


def video_ref(part: dict[str, Any]) -> VideoRef:
    """A video part's reference and sampling fields (those in its video_url object win)."""
    inner = part.get("video_url")
    fields = {**part, **inner} if isinstance(inner, dict) else part
    values: dict[str, Any] = {}
    for key in VIDEO_FIELDS:
        value = fields.get(key)
        if value is None:
            continue
        integral = key != "fps"
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or value <= 0
            or (integral and not float(value).is_integer())
        ):
            kind = "a positive integer" if integral else "a positive number"
            raise ChatRenderError(f"video {key} must be {kind}, got {value!r}")
        values[key] = int(value) if integral else float(value)
    return VideoRef(url=_video_url(part), **values)


def video_refs(messages: list[ChatMessage]) -> list[VideoRef]:
    """The videos of a chat request in message order: each video part, and each run of
    consecutive frame parts of one message (one video of those frames)."""
    out: list[VideoRef] = []
    for m in messages:
        if not isinstance(m.content, list):
            continue
        run: list[str] = []
        for part in [*m.content, {}]:  # {} ends a final run
            if _is_frame(part):
                run.append(_image_url(part))
                continue
            if run:
                out.append(VideoRef(frames=run))
                run = []
            if part.get("type") in _VIDEO_PART_TYPES:
                out.append(video_ref(part))
    return out


def _flatten_content(
    content: str | list[dict[str, Any]] | None,
    image_refusal: str | None,
    video_refusal: str | None = "this model does not accept video inputs",
) -> Any:
    """Text parts join into one string (text-model templates expect a string, as in vLLM);
    parts with an image stay parts, unless `image_refusal` says why images cannot pass. A video
    part reaches the template as {"type": "video", "video": url}, the shape transformers'
    processor templates test for."""
    if content is None or isinstance(content, str):
        return content
    texts: list[str] = []
    has_image = False
    parts: list[dict[str, Any]] = []
    for part in content:
        if _is_frame(part):
            if video_refusal is not None:
                raise ChatRenderError(video_refusal)
            _image_url(part)
            if not (parts and parts[-1].get("frames")):  # a run of frames: one video part
                parts.append({"type": "video", "video": "frames", "frames": True})
            has_image = True
            continue
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise ChatRenderError("a text content part must carry a string 'text'")
            texts.append(text)
        elif kind in _IMAGE_PART_TYPES:
            if image_refusal is not None:
                raise ChatRenderError(image_refusal)
            _image_url(part)
            has_image = True
        elif kind in _VIDEO_PART_TYPES:
            if video_refusal is not None:
                raise ChatRenderError(video_refusal)
            part = {"type": "video", "video": video_ref(part).url}
            has_image = True
        else:
            raise ChatRenderError(f"unsupported content part type {kind!r}")
        parts.append(part)
    return parts if has_image else "\n".join(texts)


def messages_to_dicts(
    messages: list[ChatMessage],
    image_refusal: str | None = "this model takes no images",
    video_refusal: str | None = "this model does not accept video inputs",
) -> list[dict[str, Any]]:
    """ChatMessage structs as the plain dicts jinja templates index; None fields dropped."""
    out: list[dict[str, Any]] = []
    for m in messages:
        d = {k: v for k, v in msgspec.structs.asdict(m).items() if v is not None}
        if "content" in d:
            d["content"] = _flatten_content(d["content"], image_refusal, video_refusal)
        out.append(d)
    return out


def template_places_videos(tokenizer: Any, template: str | None, video_token: str) -> bool:
    """Whether `template` (None: the tokenizer's own) renders one video part as exactly one
    `video_token`."""
    probe = [
        {"role": "user", "content": [
            {"type": "video", "video": "probe"}, {"type": "text", "text": "?"},
        ]},
    ]  # fmt: skip
    try:
        text = tokenizer.apply_chat_template(
            probe, chat_template=template, tokenize=False, add_generation_prompt=True
        )
    except Exception:  # any template error (or none at all): no videos through it
        return False
    return isinstance(text, str) and text.count(video_token) == 1


class ChatRenderer:
    """Renders chat requests with one resolved template through the tokenizer's
    `apply_chat_template` (so templates see the tokenizer's special tokens)."""

    def __init__(
        self,
        tokenizer: Any,
        spec: str | None,
        model_takes_images: bool = False,
        image_token: str | None = None,
        video_token: str | None = None,
    ) -> None:
        """`image_token`: the placeholder the model's processor expands (e.g. <|image_pad|>);
        with it, the tokenizer's own template is tried on one image part and trusted with
        images if it places exactly one such placeholder (as real Qwen2-VL templates do)."""
        self._tokenizer = tokenizer
        self.image_refusal: str | None = None  # why image parts are refused, if they are
        if not model_takes_images:
            self.image_refusal = "this model does not accept image inputs"
        elif spec is None and image_token and own_template_places(tokenizer, image_token):
            pass
        elif not template_places_images(spec):
            vision = ", ".join(sorted(n for n, t in BUILTIN_TEMPLATES.items() if t.vision))
            name = repr(spec) if spec else "of the tokenizer"
            self.image_refusal = (
                f"the chat template {name} does not place images; start the server with a "
                f"vision --chat-template ({vision}) to send images"
            )
        # None: the tokenizer's own template, which may be missing (checked per request).
        self.template = load_chat_template(spec)
        self.available = self.template is not None or bool(
            getattr(tokenizer, "chat_template", None)
        )
        # `video_token`: the model's video placeholder (None: it takes no videos).
        self.video_refusal: str | None = "this model does not accept video inputs"
        if video_token is not None and self.image_refusal is None:
            if template_places_videos(tokenizer, self.template, video_token):
                self.video_refusal = None
            else:
                self.video_refusal = (
                    f"the chat template does not place a video part as one {video_token}; "
                    "start the server with a --chat-template that does to send videos"
                )

    def render(
        self,
        messages: list[ChatMessage],
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
        *,
        continue_final_message: bool = False,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """The prompt text; `tools` (OpenAI function tools) reach the template as `tools`."""
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
        conversation = messages_to_dicts(messages, self.image_refusal, self.video_refusal)
        try:
            text = self._tokenizer.apply_chat_template(
                conversation,
                chat_template=self.template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tools=tools or None,
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
