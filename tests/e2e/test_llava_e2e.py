"""launch_server on tiny LLaVA-1.5, LLaVA-NeXT, Llama3-LLaVA-NeXT and LLaVA-OneVision checkpoints
with their built-in chat templates (vicuna_v1.1, llava_llama_3, chatml-llava), driven by the
openai client with images from a local HTTP host: greedy outputs equal transformers' on the
same images; OneVision's image-among-several variant never reuses the image-alone cache; the
offline Engine with image_data; an original checkpoint naming an unknown tower fails at launch
in one line."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from llava_helpers import N_NEW, LlavaReference
from PIL import Image
from server_harness import Server, serve_module
from tiny_models import LLAVA_KINDS, make_original_llava
from vision_helpers import ImageHost, image_part, png, text_part

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=list(LLAVA_KINDS))
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def model_dir(kind: str, request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(f"tiny_{kind}")  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def server(
    model_dir: Path, kind: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    yield from serve_module(
        model_dir, "--chat-template", LLAVA_KINDS[kind][1], "--allow-private-media-urls",
        "--served-model-name", "tiny-llava", "--max-total-tokens", "4000", logs=tmp_path_factory,
    )  # fmt: skip


@pytest.fixture(scope="module")
def ref(model_dir: Path, kind: str) -> LlavaReference:
    return LlavaReference(model_dir, kind)


def cases(host: ImageHost) -> dict[str, list[dict[str, Any]]]:
    return {
        "text": [{"role": "user", "content": "Hello there"}],
        "one": [{"role": "user", "content": [image_part(host.url("dog")), text_part("What?")]}],
        "two": [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    text_part("First"),
                    image_part(host.url("cat")),
                    text_part("then"),
                    image_part(host.url("dog")),
                    text_part("compare."),
                ],
            },
        ],
        "second_turn": [
            {"role": "user", "content": [image_part(host.url("owl")), text_part("Describe.")]},
            {"role": "assistant", "content": "A bird."},
            {"role": "user", "content": "What colour?"},
        ],
    }


def images_of(messages: list[dict[str, Any]]) -> list[Image.Image]:
    names = [
        p["image_url"]["url"].rsplit("/", 1)[-1].removesuffix(".png")
        for m in messages if isinstance(m["content"], list)
        for p in m["content"] if p["type"] == "image_url"
    ]  # fmt: skip
    return [Image.open(io.BytesIO(png(n))).convert("RGB") for n in names]


def expected(ref: LlavaReference, messages: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
    """(prompt ids, transformers' greedy continuation)."""
    ids, kw = ref.prompt(messages, images_of(messages))
    return ids, ref.greedy(ids, kw)


def chat(client: openai.OpenAI, messages: list[dict[str, Any]], max_tokens: int = N_NEW) -> Any:
    return client.chat.completions.create(
        model="tiny-llava",
        messages=messages,  # type: ignore[arg-type]
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"ignore_eos": True},
    )


@pytest.mark.parametrize("case", ["text", "one", "two", "second_turn"])
def test_chat_greedy_matches_transformers(
    client: openai.OpenAI, ref: LlavaReference, host: ImageHost, case: str
) -> None:
    messages = cases(host)[case]
    ids, tokens = expected(ref, messages)
    resp = chat(client, messages)
    assert resp.choices[0].message.content == ref.tok.decode(tokens, skip_special_tokens=True)
    assert resp.usage is not None and resp.usage.completion_tokens == N_NEW
    assert resp.usage.prompt_tokens == len(ids)


def test_generate_with_image_data_gives_exact_ids(server: Server, ref: LlavaReference) -> None:
    """The native route: the rendered prompt with its `<image>` placeholders, images as data
    URIs (two: OneVision takes each as one padded tile)."""
    messages = [{"role": "user", "content": [image_part("x/cat.png"), image_part("x/owl.png")]}]
    _, tokens = expected(ref, messages)
    body = {
        "text": ref.render(messages),
        "image_data": [
            "data:image/png;base64," + base64.b64encode(png(n)).decode() for n in ("cat", "owl")
        ],
        "sampling_params": {"max_new_tokens": N_NEW, "temperature": 0, "ignore_eos": True},
    }
    out = httpx.post(server.base + "/generate", json=body, timeout=60).json()
    assert out["output_ids"] == tokens


def test_an_image_alone_and_among_several_do_not_share_cache(
    server: Server, client: openai.OpenAI, ref: LlavaReference, host: ImageHost
) -> None:
    """The same image first alone, then first of two with the same text before it: the
    prefix hit stops where the image starts whenever the two are processed differently
    (OneVision), and covers it otherwise; both answers are transformers'."""
    alone = [{"role": "user", "content": [image_part(host.url("fox")), text_part("Hm?")]}]
    pair = [
        {
            "role": "user",
            "content": [image_part(host.url("fox")), image_part(host.url("elk")), text_part("?")],
        }
    ]
    server.wait_idle()
    prompts = []
    for messages in (alone, pair):
        ids, tokens = expected(ref, messages)
        resp = chat(client, messages)
        assert resp.choices[0].message.content == ref.tok.decode(tokens, skip_special_tokens=True)
        prompts.append(ids)
    assert resp.usage is not None and resp.usage.prompt_tokens_details is not None
    cached = resp.usage.prompt_tokens_details.cached_tokens
    first_image = ids.index(ref.image_token)
    if ref.family == "llava_onevision":
        assert cached == first_image
    else:  # the image's tokens and the newline after it
        a, b = prompts
        common = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
        assert cached == common > first_image + prompts[0].count(ref.image_token)
    s = server.wait_idle()
    assert s["free_slots"] + s["tree_slots"] == s["total_slots"]


def test_engine_generate_with_images(tiny_llava_onevision: Path) -> None:
    from fovea import Engine

    ref = LlavaReference(tiny_llava_onevision, "llava_onevision")

    def chat_of(*names: str) -> list[dict[str, Any]]:
        parts = [image_part(f"x/{n}.png") for n in names]
        return [{"role": "user", "content": [*parts, text_part("What is it?")]}]

    greedy = {"max_new_tokens": N_NEW, "temperature": 0, "ignore_eos": True}
    cases = [chat_of("cat"), chat_of("dog", "owl")]
    images = [
        Image.open(io.BytesIO(png("cat"))),  # a PIL image
        [png("dog"), "data:image/png;base64," + base64.b64encode(png("owl")).decode()],
    ]
    with Engine(
        dtype="float32",  # the reference runs float32
        model_path=str(tiny_llava_onevision),
        max_total_tokens=3000,
        chat_template="chatml-llava",
    ) as llm:
        outs = llm.generate([ref.render(m) for m in cases], greedy, image_data=images)
        assert [o["output_ids"] for o in outs] == [expected(ref, m)[1] for m in cases]


def test_unknown_tower_fails_at_launch_in_one_line(tiny_llava_next: Path, tmp_path: Path) -> None:
    import json

    out = make_original_llava(tiny_llava_next, tmp_path / "orig")
    cfg = json.loads((out / "config.json").read_text())
    del cfg["mm_vision_tower_config"]
    cfg["mm_vision_tower"] = "someone/my-tower"
    (out / "config.json").write_text(json.dumps(cfg))
    proc = subprocess.run(
        [sys.executable, "-m", "fovea.launch_server", "--model-path", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"launch_server: error: {out / 'config.json'}: unknown vision tower 'someone/my-tower' "
        "(mm_vision_tower); known: openai/clip-vit-large-patch14-336, "
        "google/siglip-so400m-patch14-384; for another tower put its transformers "
        "vision_config (with model_type) in config.json as mm_vision_tower_config"
    )
