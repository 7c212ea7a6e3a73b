"""launch_server on the tiny MiniCPM-V checkpoints, one server per layout (2.6 with the
built-in minicpmv template; 4.6 with its checkpoint's own chat_template.jinja, as a file),
prefill chunks of 24 tokens, driven by the openai client with images as data URIs: greedy
outputs equal the reference's (tests/fixtures/minicpmv_reference.py) for text only, one sliced
image and two images; the same image again is a prefix hit that encodes none of its views."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import vision_helpers
from minicpmv_reference import N_NEW, MiniCPMV26Reference, MiniCPMV46Reference
from PIL import Image
from server_harness import Server, serve_module
from vision_helpers import text_part

pytestmark = pytest.mark.slow

# (width, height) per layout: a 1 x 2 sliced image and an unsliced one.
SIZES = {"2.6": {"wide": (240, 120), "small": (64, 48)},
         "4.6": {"wide": (480, 240), "small": (100, 80)}}  # fmt: skip


def png(layout: str, name: str, seed: int = 0) -> bytes:
    w, h = SIZES[layout][name]
    rng = np.random.default_rng(sum(map(ord, name)) + seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def image_part(data: bytes) -> dict[str, Any]:
    return vision_helpers.image_part("data:image/png;base64," + base64.b64encode(data).decode())


@pytest.fixture(scope="module", params=["2.6", "4.6"])
def layout(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def model_dir(layout: str, request: pytest.FixtureRequest) -> Path:
    name = "tiny_minicpmv" if layout == "2.6" else "tiny_minicpmv4_6"
    return request.getfixturevalue(name)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def server(
    model_dir: Path, layout: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    template = "minicpmv" if layout == "2.6" else str(model_dir / "chat_template.jinja")
    yield from serve_module(
        model_dir, "--chat-template", template, "--served-model-name", "tiny-minicpmv",
        "--max-total-tokens", "4000", "--chunked-prefill-size", "24", logs=tmp_path_factory,
    )  # fmt: skip


@pytest.fixture(scope="module")
def ref(model_dir: Path, layout: str) -> Any:
    return MiniCPMV26Reference(model_dir) if layout == "2.6" else MiniCPMV46Reference(model_dir)


def case(layout: str, name: str) -> tuple[list[dict[str, Any]], list[bytes]]:
    """(messages, their images' bytes in order); images come first in a turn, as chat()."""
    wide, small = png(layout, "wide"), png(layout, "small")
    if name == "text":
        return [{"role": "user", "content": "Paris is the capital of France."}], []
    if name == "one":
        return [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [image_part(wide), text_part("What is it?")]},
        ], [wide]
    return [
        {"role": "user", "content": [image_part(wide), image_part(small), text_part("Compare")]}
    ], [wide, small]


def chat(client: openai.OpenAI, messages: list[dict[str, Any]], n: int = N_NEW) -> Any:
    return client.chat.completions.create(
        model="tiny-minicpmv", messages=messages, max_tokens=n, temperature=0,  # type: ignore[arg-type]
        extra_body={"ignore_eos": True},
    )  # fmt: skip


def pil(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


@pytest.mark.parametrize("name", ["text", "one", "two"])
def test_chat_greedy_matches_the_reference(
    client: openai.OpenAI, ref: Any, layout: str, name: str
) -> None:
    messages, images = case(layout, name)
    pics = [pil(d) for d in images]
    expected = ref.tok.decode(ref.greedy(messages, pics), skip_special_tokens=True)
    resp = chat(client, messages)
    assert resp.choices[0].message.content == expected
    assert resp.usage is not None and resp.usage.completion_tokens == N_NEW
    assert resp.usage.prompt_tokens == len(ref.prompt(messages, pics)[0])


def test_same_image_is_a_prefix_hit_for_all_its_views(
    server: Server, client: openai.OpenAI, ref: Any, layout: str
) -> None:
    data = png(layout, "wide", seed=7)  # not used by another test: starts cold
    msgs = [{"role": "user", "content": [image_part(data), text_part("Big?")]}]
    server.wait_idle()
    encoded = server.stats()["images_encoded"]
    first = chat(client, msgs, 4).choices[0].message.content
    assert server.stats()["images_encoded"] == encoded + 3  # the global view and two slices
    again = chat(client, msgs, 4)
    assert again.choices[0].message.content == first
    assert (
        again.usage.prompt_tokens_details.cached_tokens == len(ref.prompt(msgs, [pil(data)])[0]) - 1
    )
    assert server.stats()["images_encoded"] == encoded + 3
    s = server.wait_idle()
    assert s["free_slots"] + s["tree_slots"] == s["total_slots"]
