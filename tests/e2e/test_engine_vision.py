"""The offline Engine with images (SGLang's offline VLM example): PIL images, bytes, data URIs
and allowed local paths give transformers' greedy tokens; private URLs are refused by default."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from vision_helpers import SYSTEM, ImageHost, Reference, png

pytestmark = pytest.mark.slow

GREEDY = {"max_new_tokens": 32, "temperature": 0, "ignore_eos": True}


def chat(*names: str, question: str = "What is it?") -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": f"x/{n}.png"}} for n in names
    ]
    return [SYSTEM, {"role": "user", "content": [*parts, {"type": "text", "text": question}]}]


# 64 patch rows a slice: the tiny tower's blocks run one a step, images encoded ahead of
# their prefill (worker/encode_ahead.py) through every process: the same tokens.
@pytest.mark.parametrize("slice_patches", [0, 64])
def test_engine_generate_with_images(
    tiny_qwen2_vl: Path, tmp_path: Path, slice_patches: int
) -> None:
    from fovea import Engine

    ref = Reference(tiny_qwen2_vl)

    def prompt(messages: list[dict[str, Any]]) -> str:
        text: str = ref.tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return text

    (tmp_path / "owl.png").write_bytes(png("owl"))
    host = ImageHost()
    try:
        with Engine(
            dtype="float32",  # the reference runs float32
            model_path=str(tiny_qwen2_vl),
            max_total_tokens=3000,
            chat_template="qwen2-vl",
            allowed_local_media_path=str(tmp_path),
            encoder_slice_patches=slice_patches,
        ) as llm:
            cases = [
                (chat("cat"), Image.open(io.BytesIO(png("cat")))),  # a PIL image
                (chat("dog"), png("dog")),  # file bytes
                (chat("owl"), str(tmp_path / "owl.png")),  # an allowed local path
                (chat("dog", "owl"), [  # two images: a data URI and a file:// URL
                    "data:image/png;base64," + base64.b64encode(png("dog")).decode(),
                    f"file://{tmp_path / 'owl.png'}",
                ]),
            ]  # fmt: skip
            outs = llm.generate(
                [prompt(m) for m, _ in cases], GREEDY, image_data=[img for _, img in cases]
            )
            assert [o["output_ids"] for o in outs] == [ref.greedy(m) for m, _ in cases]

            # Without --allow-private-media-urls a loopback URL is refused before any fetch.
            with pytest.raises(ValueError, match="resolves to a private or local address"):
                llm.generate(prompt(chat("cat")), GREEDY, image_data=host.url("cat"))
            assert host.hits == {}
            with pytest.raises(ValueError, match="outside --allowed-local-media-path"):
                llm.generate(prompt(chat("cat")), GREEDY, image_data="/etc/hostname")
            with pytest.raises(
                ValueError, match="the prompt has 0 image placeholders but 1 images were given"
            ):
                llm.generate("no placeholder here", GREEDY, image_data=png("cat"))
            stats = llm.get_server_info()["scheduler"]
            assert stats["free_slots"] + stats["tree_slots"] == stats["total_slots"]
    finally:
        host.httpd.shutdown()
