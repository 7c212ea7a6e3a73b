"""bench/hf_generate.py's image floor builds the same requests serving.py sends: the same text
pieces, image order and JPEG bytes (a fake processor records what it is given)."""

from __future__ import annotations

import io
from typing import Any

import torch
from PIL import Image

from fovea.bench import hf_generate
from fovea.bench.image_server import image_bytes
from fovea.bench.prompts import Prompt


class RecordingProcessor:
    def __init__(self) -> None:
        self.conversations: list[Any] = []
        self.images: list[Image.Image] = []

    def apply_chat_template(self, conv: Any, add_generation_prompt: bool, tokenize: bool) -> str:
        assert add_generation_prompt and not tokenize
        self.conversations.append(conv)
        return f"text{len(self.conversations)}"

    def __call__(self, text: list[str], images: list[Image.Image], **kw: Any) -> dict[str, Any]:
        self.images = images
        return {"input_ids": torch.tensor([[1]]), "texts": text}


def test_w6_shaped_batch_interleaves_images_in_serving_order() -> None:
    args = hf_generate.parse_args([
        "--model", "m", "--images", "3", "--interleave", "--image-size", "64x48",
        "--image-offset", "200000", "--output-len", "4", "--device", "cpu",
    ])  # fmt: skip
    proc = RecordingProcessor()
    prompts = [Prompt("aa bb cc dd", [1, 2, 3, 4]), Prompt("ee ff gg hh", [5, 6, 7, 8])]
    batch = hf_generate.image_inputs(args, proc, prompts, first=4)
    assert list(batch) == ["input_ids"]  # only tensors go to the model
    (msg,) = proc.conversations[1]
    assert msg["role"] == "user" and [p["type"] for p in msg["content"]] == [
        "text", "image", "text", "image", "text", "image", "text",
    ]  # fmt: skip
    assert "".join(p["text"] for p in msg["content"] if p["type"] == "text") == "ee ff gg hh"
    # Request 5's images are ids 15, 16, 17 (+ offset), as serving.image_ids gives them.
    assert len(proc.images) == 6 and proc.images[3].size == (64, 48)
    want = Image.open(io.BytesIO(image_bytes(200015, 64, 48))).convert("RGB")
    assert proc.images[3].tobytes() == want.tobytes()
