"""launch_server on the tiny Llama 3.2 Vision checkpoint with --chat-template llama_3_vision
(the spec's launch), driven by the openai client with images from a local HTTP host: greedy
outputs equal transformers' (the checkpoint's own template, MllamaProcessor) for one image,
two images, text only and a second turn, in prefill chunks of 8; /generate with image_data;
prefix hits only for the same image; bad images and requests get 400 and the next request
works; two requests with one image compute its cross-attention K/V once; after a client
disconnect and after forced retractions every image slot is free."""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import requests
from mllama_helpers import DATE, MllamaReference
from PIL import Image
from server_harness import Server, serve_module
from vision_helpers import N_NEW, ImageHost, image_part, png, text_part

pytestmark = pytest.mark.slow

MODEL = "tiny-mllama"
IMAGE_SLOTS = 4  # max(--max-running-requests 4, --max-images-per-request 2)


@pytest.fixture(scope="module")
def server(tiny_mllama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from serve_module(
        tiny_mllama, "--chat-template", "llama_3_vision", "--allow-private-media-urls",
        "--served-model-name", MODEL, "--max-total-tokens", "160", "--chunked-prefill-size",
        "8", "--max-running-requests", "4", "--max-images-per-request", "2",
        logs=tmp_path_factory,
    )  # fmt: skip


@pytest.fixture(scope="module")
def ref(tiny_mllama: Path) -> MllamaReference:
    return MllamaReference(tiny_mllama)


def expected(ref: MllamaReference, messages: list[dict[str, Any]], n: int = N_NEW) -> Any:
    """(prompt ids, greedy token ids) of transformers for OpenAI-style messages whose image
    URLs name vision_helpers' images."""
    names: list[str] = []
    hf = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            parts = []
            for p in content:
                if p["type"] == "image_url":
                    names.append(p["image_url"]["url"].rsplit("/", 1)[-1].removesuffix(".png"))
                    parts.append({"type": "image"})
                else:
                    parts.append(p)
            content = parts
        hf.append({**m, "content": content})
    images = [Image.open(io.BytesIO(png(n))).convert("RGB") for n in names]
    ids, kw = ref.inputs(ref.render(hf), images)
    return ids, ref.greedy(ids, kw, n)


def cases(host: ImageHost) -> dict[str, list[dict[str, Any]]]:
    return {
        "one": [{"role": "user", "content": [image_part(host.url("cat")), text_part("What?")]}],
        "two": [
            {
                "role": "user",
                "content": [
                    image_part(host.url("cat")),
                    image_part(host.url("dog")),
                    text_part("Describe the first image, then the second."),
                ],
            }
        ],
        "text": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Paris is the capital of France."},
        ],
        "second_turn": [
            {"role": "user", "content": [text_part("Look:"), image_part(host.url("owl"))]},
            {"role": "assistant", "content": "A bird."},
            {"role": "user", "content": "What colour?"},
        ],
    }


def chat(client: openai.OpenAI, messages: list[dict[str, Any]], n: int = N_NEW, **kw: Any) -> Any:
    return client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=n, temperature=0,  # type: ignore[arg-type]
        extra_body={"ignore_eos": True, "chat_template_kwargs": {"date_string": DATE}}, **kw,
    )  # fmt: skip


@pytest.mark.parametrize("case", ["one", "two", "text", "second_turn"])
def test_chat_greedy_matches_transformers(
    client: openai.OpenAI, ref: MllamaReference, host: ImageHost, case: str
) -> None:
    messages = cases(host)[case]
    ids, tokens = expected(ref, messages)
    resp = chat(client, messages)
    assert resp.choices[0].message.content == ref.tok.decode(tokens, skip_special_tokens=True)
    assert resp.usage is not None and resp.usage.completion_tokens == N_NEW
    assert resp.usage.prompt_tokens == len(ids)


def test_streaming_with_two_images(
    client: openai.OpenAI, ref: MllamaReference, host: ImageHost
) -> None:
    messages = cases(host)["two"]
    text = "".join(c.choices[0].delta.content or "" for c in chat(client, messages, stream=True))
    assert text == ref.tok.decode(expected(ref, messages)[1], skip_special_tokens=True)


def test_generate_with_image_data_gives_exact_ids(server: Server, ref: MllamaReference) -> None:
    """The native route: a raw prompt (the tokenizer adds the BOS) with `<|image|>`, the image
    as a data URI; transformers on the same ids (processor given the BOS in the text)."""
    prompt = "<|image|>If I had to write a haiku for this one"
    body = {
        "text": prompt,
        "image_data": "data:image/png;base64," + base64.b64encode(png("dog")).decode(),
        "sampling_params": {"max_new_tokens": N_NEW, "temperature": 0, "ignore_eos": True},
    }
    out = httpx.post(server.base + "/generate", json=body, timeout=60).json()
    image = Image.open(io.BytesIO(png("dog"))).convert("RGB")
    ids, kw = ref.inputs("<|begin_of_text|>" + prompt, [image])
    assert ids[:2] == [3, 400]
    assert out["output_ids"] == ref.greedy(ids, kw, N_NEW)


def test_prefix_cache_only_for_the_same_image(
    server: Server, client: openai.OpenAI, ref: MllamaReference, host: ImageHost
) -> None:
    def ask(name: str) -> tuple[int, list[int]]:
        msgs = [{"role": "user", "content": [image_part(host.url(name)), text_part("Big?")]}]
        r = chat(client, msgs, 2)
        assert r.usage is not None and r.usage.prompt_tokens_details is not None
        return r.usage.prompt_tokens_details.cached_tokens, expected(ref, msgs, 1)[0]

    server.wait_idle()
    encoded = server.stats()["images_encoded"]
    ask("fox")
    cached, ids = ask("fox")
    assert cached == len(ids) - 1
    assert server.stats()["images_encoded"] == encoded + 1
    # Another image, same text: no hit at all (every token's KV depends on the images).
    cached, ids2 = ask("elk")
    assert len(ids2) == len(ids) and cached == 0
    assert server.stats()["images_encoded"] == encoded + 2


def test_bad_requests_get_400_and_the_server_goes_on(
    server: Server, client: openai.OpenAI, host: ImageHost
) -> None:
    def bad(messages: list[dict[str, Any]]) -> str:
        with pytest.raises(openai.BadRequestError) as e:
            chat(client, messages, 2)
        return str(e.value)

    junk = "data:image/png;base64," + base64.b64encode(b"x" * 64).decode()
    assert "could not be decoded" in bad([{"role": "user", "content": [image_part(junk)]}])
    three = [image_part(host.url(n)) for n in ("cat", "dog", "owl")]
    many = bad([{"role": "user", "content": [*three, text_part("?")]}])
    assert "too many images: 3 given, at most 2 per request" in many
    with_system = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [image_part(host.url("cat")), text_part("?")]},
    ]
    assert "Prompting with images is incompatible with system messages" in bad(with_system)
    # The next request works: the spec's "Python requests" shape (text part, then the image).
    body = {
        "model": MODEL, "max_tokens": 2, "ignore_eos": True,
        "messages": [{"role": "user", "content": [
            text_part("What’s in this image?"), image_part(host.url("cat"))]}],
    }  # fmt: skip
    ok = requests.post(f"{server.base}/v1/chat/completions", json=body, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def assert_image_slots_all_free(server: Server) -> dict[str, int]:
    s = server.wait_idle()
    assert s["image_slots"] == s["free_image_slots"] == IMAGE_SLOTS
    assert s["image_slot_users"] == s["shared_image_slots"] == 0
    assert s["free_slots"] + s["tree_slots"] == s["total_slots"]
    return s


def test_requests_with_one_image_compute_its_cross_kv_once(
    server: Server, client: openai.OpenAI, ref: MllamaReference, host: ImageHost
) -> None:
    """Two requests with the same cold image at once, different questions: one
    vision-encoder run and one cross-attention K/V fill (a slot shared while both run, or
    kept free with its K/V for the later one); both give transformers' tokens."""
    before = server.wait_idle()
    msgs = {
        q: [{"role": "user", "content": [image_part(host.url("yak")), text_part(q)]}]
        for q in ("Hm?", "Why so?")
    }
    got: dict[str, str] = {}

    def run(q: str) -> None:
        got[q] = chat(client, msgs[q]).choices[0].message.content

    threads = [threading.Thread(target=run, args=(q,)) for q in msgs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for q in msgs:
        assert got[q] == ref.tok.decode(expected(ref, msgs[q])[1], skip_special_tokens=True)
    after = assert_image_slots_all_free(server)
    assert after["images_encoded"] - before["images_encoded"] == 1
    assert after["cross_kv_computed"] - before["cross_kv_computed"] == 1


def test_client_disconnect_frees_the_image_slots(server: Server, host: ImageHost) -> None:
    body = {
        "model": MODEL, "messages": cases(host)["two"], "max_tokens": 60, "temperature": 0,
        "ignore_eos": True, "stream": True,
    }  # fmt: skip
    with httpx.stream("POST", server.base + "/v1/chat/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert any(next(lines).startswith("data: ") for _ in range(4))
        assert server.stats()["free_image_slots"] == IMAGE_SLOTS - 2
    assert_image_slots_all_free(server)


def test_forced_retractions_free_and_retake_image_slots(
    server: Server, client: openai.OpenAI, ref: MllamaReference, host: ImageHost
) -> None:
    """Three requests of ~70 tokens each in a 160-token KV cache: some are retracted and
    re-admitted (into the slot that kept their image's K/V, unless another image took it),
    all give transformers' tokens."""
    server.wait_idle()
    before = server.stats()["retractions"]
    names = ("cat", "dog", "owl")
    msgs = {
        n: [{"role": "user", "content": [image_part(host.url(n)), text_part("Hm?")]}] for n in names
    }
    got: dict[str, str] = {}

    def run(name: str) -> None:
        got[name] = chat(client, msgs[name], 50).choices[0].message.content

    threads = [threading.Thread(target=run, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for n in names:
        assert got[n] == ref.tok.decode(expected(ref, msgs[n], 50)[1], skip_special_tokens=True)
    assert server.stats()["retractions"] > before
    assert_image_slots_all_free(server)
