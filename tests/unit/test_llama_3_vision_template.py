"""The llama_3_vision built-in template renders what Llama 3.2 Vision Instruct's own chat
template renders (golden strings, and equality with that template rendered by transformers
for {"type": "image"} parts): `<|image|>` where each image part is, the dated system turn on
text-only prompts, a system message beside images refused as the model's template does."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from tiny_mllama import LLAMA_3_2_VISION_CHAT_TEMPLATE

from fovea.common.messages import ChatMessage, ImageRef
from fovea.tokenizer_service.builtin_templates import BUILTIN_TEMPLATES
from fovea.tokenizer_service.chat_templates import ChatRenderer, ChatRenderError, image_refs

BOS = "<|begin_of_text|>"
USER = "<|start_header_id|>user<|end_header_id|>\n\n"
ASSISTANT = "<|start_header_id|>assistant<|end_header_id|>\n\n"
EOT = "<|eot_id|>"
DATED = (
    "<|start_header_id|>system<|end_header_id|>\n\n"
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
)


def img(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def text(t: str) -> dict[str, Any]:
    return {"type": "text", "text": t}


@pytest.fixture(scope="module")
def tok(tiny_mllama: Path) -> Any:
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(str(tiny_mllama))
    assert t.chat_template == LLAMA_3_2_VISION_CHAT_TEMPLATE  # the model's own
    return t


def render(tok: Any, messages: list[ChatMessage], gen: bool = True, **kw: Any) -> str:
    renderer = ChatRenderer(tok, "llama_3_vision", model_takes_images=True)
    return renderer.render(messages, gen, {"date_string": "26 Jul 2024", **kw})


def own_template(tok: Any, messages: list[ChatMessage], gen: bool = True) -> str:
    """The checkpoint's template on the same conversation, image parts as {"type": "image"}."""
    conv = [
        {
            "role": m.role,
            "content": m.content
            if isinstance(m.content, str)
            else [{"type": "image"} if p["type"] == "image_url" else p for p in m.content or []],
        }
        for m in messages
    ]
    out: str = tok.apply_chat_template(
        conv, tokenize=False, add_generation_prompt=gen, date_string="26 Jul 2024"
    )
    return out


def test_registered_as_a_vision_template() -> None:
    assert BUILTIN_TEMPLATES["llama_3_vision"].vision


def test_one_image(tok: Any) -> None:
    msgs = [ChatMessage("user", [img("a"), text("What is in this image?")])]
    expected = f"{BOS}{USER}<|image|>What is in this image?{EOT}{ASSISTANT}"
    assert render(tok, msgs) == expected == own_template(tok, msgs)


def test_two_images_in_part_order(tok: Any) -> None:
    msgs = [ChatMessage("user", [img("a"), img("b"), text("Describe both.")])]
    assert render(tok, msgs) == f"{BOS}{USER}<|image|><|image|>Describe both.{EOT}{ASSISTANT}"
    # Text first, as in the OpenAI examples: the image token goes where its part is.
    msgs = [ChatMessage("user", [text("What's in this image?"), img("a"), text(" Short.")])]
    expected = f"{BOS}{USER}What's in this image?<|image|> Short.{EOT}{ASSISTANT}"
    assert render(tok, msgs) == expected == own_template(tok, msgs)
    assert image_refs(msgs) == [ImageRef(url="a")]


def test_system_prompt(tok: Any) -> None:
    """Without images: the dated system turn holds the system message (trimmed); with none,
    the dated turn is still there, empty. Today's date when no date_string is given."""
    msgs = [ChatMessage("system", "  Be brief. "), ChatMessage("user", "Hi")]
    expected = f"{BOS}{DATED}Be brief.{EOT}{USER}Hi{EOT}{ASSISTANT}"
    assert render(tok, msgs) == expected == own_template(tok, msgs)
    assert render(tok, msgs[1:]) == f"{BOS}{DATED}{EOT}{USER}Hi{EOT}{ASSISTANT}"
    before = time.strftime("%d %b %Y")
    renderer = ChatRenderer(tok, "llama_3_vision", model_takes_images=True)
    out = renderer.render(msgs[1:])
    assert any(f"Today Date: {d}\n\n" in out for d in (before, time.strftime("%d %b %Y")))


def test_system_prompt_beside_images_is_refused(tok: Any) -> None:
    msgs = [ChatMessage("system", "Be brief."), ChatMessage("user", [img("a"), text("Hi")])]
    with pytest.raises(ChatRenderError) as e:
        render(tok, msgs)
    assert e.value.message == (
        "chat template error: Prompting with images is incompatible with system messages."
    )


def test_multi_turn(tok: Any) -> None:
    msgs = [
        ChatMessage("user", [img("a"), text("Describe.")]),
        ChatMessage("assistant", "A cat."),
        ChatMessage("user", [text("And this one?"), img("b")]),
    ]
    expected = (
        f"{BOS}{USER}<|image|>Describe.{EOT}{ASSISTANT}A cat.{EOT}"
        f"{USER}And this one?<|image|>{EOT}{ASSISTANT}"
    )
    assert render(tok, msgs) == expected == own_template(tok, msgs)
    assert (
        render(tok, msgs[:2], gen=False)
        == f"{BOS}{USER}<|image|>Describe.{EOT}{ASSISTANT}A cat.{EOT}"
    )
    assert [r.url for r in image_refs(msgs)] == ["a", "b"]
