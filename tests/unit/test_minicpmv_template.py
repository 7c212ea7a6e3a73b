"""The minicpmv built-in template renders MiniCPM-V 2.6's own format (golden strings): Qwen2's
ChatML with its default system turn, a turn's images first as `(<image>./</image>)`, then its
text parts, joined by newlines, as the model's chat() builds a message."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from tiny_models import make_tokenizer

from fovea.common.messages import ChatMessage, ImageRef
from fovea.tokenizer_service.chat_templates import ChatRenderer, image_refs

SYS = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
IMG = "(<image>./</image>)"
GEN = "<|im_start|>assistant\n"


def img(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def text(t: str) -> dict[str, Any]:
    return {"type": "text", "text": t}


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoTokenizer

    d: Path = tmp_path_factory.mktemp("tok")
    make_tokenizer(d)
    return AutoTokenizer.from_pretrained(d)


def render(tok: Any, messages: list[ChatMessage], generation: bool = True) -> str:
    return ChatRenderer(tok, "minicpmv", model_takes_images=True).render(messages, generation)


def test_one_image(tok: Any) -> None:
    msgs = [ChatMessage("user", [img("a"), text("What is this?")])]
    assert render(tok, msgs) == f"{SYS}<|im_start|>user\n{IMG}\nWhat is this?<|im_end|>\n{GEN}"


def test_two_images_come_before_the_text_of_their_turn(tok: Any) -> None:
    msgs = [ChatMessage("user", [text("Compare"), img("a"), text("with"), img("b")])]
    assert render(tok, msgs) == (
        f"{SYS}<|im_start|>user\n{IMG}\n{IMG}\nCompare\nwith<|im_end|>\n{GEN}"
    )
    assert image_refs(msgs) == [ImageRef(url="a"), ImageRef(url="b")]


def test_a_system_prompt_replaces_the_default(tok: Any) -> None:
    msgs = [ChatMessage("system", "Be brief."), ChatMessage("user", [img("a"), text("Why?")])]
    assert render(tok, msgs) == (
        f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{IMG}\nWhy?<|im_end|>\n{GEN}"
    )


def test_multi_turn(tok: Any) -> None:
    msgs = [
        ChatMessage("user", [img("a"), text("Describe.")]),
        ChatMessage("assistant", "A cat."),
        ChatMessage("user", [text("And this?"), img("b")]),
    ]
    assert render(tok, msgs, generation=False) == (
        f"{SYS}<|im_start|>user\n{IMG}\nDescribe.<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n"
        f"<|im_start|>user\n{IMG}\nAnd this?<|im_end|>\n"
    )
    assert [r.url for r in image_refs(msgs)] == ["a", "b"]


def test_text_only_turns(tok: Any) -> None:
    msgs = [ChatMessage("user", [text("a"), text("b")]), ChatMessage("assistant", None)]
    assert render(tok, msgs, generation=False) == (
        f"{SYS}<|im_start|>user\na\nb<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n"
    )
