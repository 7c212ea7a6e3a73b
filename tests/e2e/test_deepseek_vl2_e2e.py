"""launch_server on the tiny DeepSeek-VL2 (MLA, MoE) checkpoint with --chat-template
deepseek-vl2 at --tp-size 2 (experts, attention heads and the SigLIP tower split over two
ranks), driven by the openai client with images from a local HTTP server: greedy answers
equal the reference's (deepseek_vl2_reference.py: DeepSeek-VL2's conversation format and
processor, transformers' models) for text only, one image and two images, and the prompt
token counts equal its prompt's; /get_server_info reports the MLA latent pool."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import vision_helpers
from deepseek_vl2_reference import Reference, format_conversation
from PIL import Image
from server_harness import Server, serve_module
from vision_helpers import N_NEW, ImageHost, png

pytestmark = pytest.mark.slow

MODEL = "tiny-deepseek-vl2"


@pytest.fixture(scope="module")
def server(tiny_deepseek_vl2: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from serve_module(
        tiny_deepseek_vl2, "--chat-template", "deepseek-vl2", "--allow-private-media-urls",
        "--served-model-name", MODEL, "--max-total-tokens", "4000", "--tp-size", "2",
        logs=tmp_path_factory,
    )  # fmt: skip


@pytest.fixture(scope="module")
def ref(tiny_deepseek_vl2: Path) -> Reference:
    return Reference(tiny_deepseek_vl2)


def image_part(host: ImageHost, name: str) -> dict[str, Any]:
    return vision_helpers.image_part(host.url(name))


# name: (OpenAI messages, the reference's system, its turns, the images by SIZES name)
def cases(host: ImageHost) -> dict[str, tuple[list[dict[str, Any]], str, list[Any], list[str]]]:
    return {
        "text": (
            [{"role": "user", "content": "Paris is the capital of France."}],
            "", [("user", "Paris is the capital of France.")], [],
        ),
        "one": (
            [{"role": "system", "content": "Be brief."},
             {"role": "user", "content": [image_part(host, "dog"),
                                          {"type": "text", "text": "What is this?"}]}],
            "Be brief.", [("user", "<image>\nWhat is this?")], ["dog"],  # 1 x 2 tiles
        ),
        "two": (
            [{"role": "user", "content": [{"type": "text", "text": "Compare"},
                                          image_part(host, "cat"), image_part(host, "dog")]}],
            "", [("user", "<image>\n<image>\nCompare")], ["cat", "dog"],
        ),
    }  # fmt: skip


@pytest.mark.parametrize("case", ["text", "one", "two"])
def test_chat_greedy_matches_reference(
    client: openai.OpenAI, ref: Reference, host: ImageHost, case: str
) -> None:
    messages, system, turns, names = cases(host)[case]
    pics = [Image.open(io.BytesIO(png(n))).convert("RGB") for n in names]
    ids, views, crops = ref.processor.tokenize_with_images(format_conversation(turns, system), pics)
    expected = ref.processor.tok.decode(
        ref.greedy(ids, views, crops, N_NEW), skip_special_tokens=True
    )
    resp = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=N_NEW, temperature=0,  # type: ignore[arg-type]
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert resp.choices[0].message.content == expected
    assert resp.usage is not None and resp.usage.completion_tokens == N_NEW
    assert resp.usage.prompt_tokens == len(ids)


def test_server_info_reports_the_latent_pool(server: Server, client: openai.OpenAI) -> None:
    """One token pool, of MLA latent rows: 3 layers x (kv_lora_rank 32 + rope key 8) float32
    a token on each rank; with nothing running its used slots are the tree's."""
    client.completions.create(model=MODEL, prompt="Paris is", max_tokens=4, temperature=0)
    stats = server.wait_idle()
    pools: Any = stats["kv_pools"]
    tree = stats["tree_slots"]
    assert pools == {
        "global": {"kind": "mla_latent", "bytes_per_token": 480, "total_slots": 4000,
                   "free_slots": 4000 - tree, "tree_slots": tree, "used_slots": tree}
    }  # fmt: skip
    assert stats["free_slots"] + stats["tree_slots"] == 4000 and stats["tree_slots"] > 0
