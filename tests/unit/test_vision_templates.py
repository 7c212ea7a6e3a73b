"""The qwen2-vl built-in template renders Qwen2-VL's own format (golden strings), images are
taken in the order the template places them, and images under a template or model that cannot
take them are refused with a message naming the fix."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from tiny_models import make_tokenizer

from fovea.common.messages import ChatMessage, ImageRef
from fovea.tokenizer_service.builtin_templates import BUILTIN_TEMPLATES
from fovea.tokenizer_service.chat_templates import ChatRenderer, ChatRenderError, image_refs

VISION = ", ".join(sorted(name for name, t in BUILTIN_TEMPLATES.items() if t.vision))
assert "qwen2-vl" in VISION
SYS = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
IMG = "<|vision_start|><|image_pad|><|vision_end|>"


def img(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url, "detail": "high"}}


def text(t: str) -> dict[str, Any]:
    return {"type": "text", "text": t}


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoTokenizer

    d: Path = tmp_path_factory.mktemp("tok")
    make_tokenizer(d)
    return AutoTokenizer.from_pretrained(d)


def render(tok: Any, messages: list[ChatMessage], **kw: Any) -> str:
    return ChatRenderer(tok, "qwen2-vl", model_takes_images=True).render(messages, True, kw)


def test_one_image(tok: Any) -> None:
    msgs = [ChatMessage("user", [img("http://x/a.png"), text("What is this?")])]
    assert render(tok, msgs) == (
        f"{SYS}<|im_start|>user\n{IMG}What is this?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_images_interleaved_with_text_and_a_system_turn(tok: Any) -> None:
    msgs = [
        ChatMessage("system", "Be brief."),
        ChatMessage("user", [text("First:"), img("a"), text(" second:"), img("b"), text("?")]),
    ]
    assert render(tok, msgs) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        f"<|im_start|>user\nFirst:{IMG} second:{IMG}?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert image_refs(msgs) == [ImageRef(url="a"), ImageRef(url="b")]


def test_image_in_an_earlier_turn(tok: Any) -> None:
    msgs = [
        ChatMessage("user", [img("a"), text("Describe.")]),
        ChatMessage("assistant", "A cat."),
        ChatMessage("user", [text("And this?"), img("b")]),
    ]
    assert render(tok, msgs) == (
        f"{SYS}<|im_start|>user\n{IMG}Describe.<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n"
        f"<|im_start|>user\nAnd this?{IMG}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert [r.url for r in image_refs(msgs)] == ["a", "b"]


def test_add_vision_id(tok: Any) -> None:
    msgs = [ChatMessage("user", [img("a"), img("b"), text("Compare.")])]
    assert render(tok, msgs, add_vision_id=True) == (
        f"{SYS}<|im_start|>user\nPicture 1: {IMG}Picture 2: {IMG}Compare.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_text_only_parts_under_the_vision_template(tok: Any) -> None:
    msgs = [ChatMessage("user", [text("a"), text("b")])]
    # Without images the parts join as for text models.
    assert render(tok, msgs) == f"{SYS}<|im_start|>user\na\nb<|im_end|>\n<|im_start|>assistant\n"


def test_images_refused_without_a_vision_template_or_model(tok: Any) -> None:
    msgs = [ChatMessage("user", [img("a"), text("?")])]
    with pytest.raises(ChatRenderError) as e:
        ChatRenderer(tok, None, model_takes_images=True).render(msgs)
    assert e.value.message == (
        "the chat template of the tokenizer does not place images; start the server with a "
        f"vision --chat-template ({VISION}) to send images"
    )
    with pytest.raises(ChatRenderError) as e:
        ChatRenderer(tok, "chatml", model_takes_images=True).render(msgs)
    assert e.value.message.startswith("the chat template 'chatml' does not place images")
    with pytest.raises(ChatRenderError) as e:
        ChatRenderer(tok, "qwen2-vl", model_takes_images=False).render(msgs)
    assert e.value.message == "this model does not accept image inputs"
    with pytest.raises(ChatRenderError) as e:
        render(tok, [ChatMessage("user", [{"type": "image_url", "image_url": {}}])])
    assert e.value.message == "an image_url content part must carry image_url.url"


def test_the_tokenizers_own_template_is_trusted_when_it_places_the_image_token(tok: Any) -> None:
    """As real Qwen2-VL checkpoints ship: the model's own template places images, so no
    --chat-template is needed; a template that drops image parts, or places another token,
    is still refused."""
    from fovea.tokenizer_service.builtin_templates import QWEN2_VL

    msgs = [ChatMessage("user", [img("a"), text("What?")])]
    own = copy.copy(tok)
    own.chat_template = QWEN2_VL
    got = ChatRenderer(own, None, True, "<|image_pad|>").render(msgs)
    assert got == f"{SYS}<|im_start|>user\n{IMG}What?<|im_end|>\n<|im_start|>assistant\n"
    for template, token in ((QWEN2_VL, "<|video_pad|>"), (tok.chat_template, "<|image_pad|>")):
        other = copy.copy(tok)
        other.chat_template = template
        with pytest.raises(ChatRenderError) as e:
            ChatRenderer(other, None, True, token).render(msgs)
        assert e.value.message.startswith("the chat template of the tokenizer does not place")
