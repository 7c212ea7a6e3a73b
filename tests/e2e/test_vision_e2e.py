"""launch_server on tiny random Qwen2-VL and Qwen2.5-VL checkpoints with --chat-template
qwen2-vl, driven by the openai client with images from a local HTTP server: greedy outputs equal
transformers' on the same images, the prefix cache tells images apart, and image inputs the
server must refuse get a 400 without harming the next request."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from server_harness import Server, serve_module
from vision_helpers import N_NEW, SYSTEM, ImageHost, Reference, png, text_part

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def model_dir(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(f"tiny_{request.param}")  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from serve_module(
        model_dir, "--chat-template", "qwen2-vl", "--allow-private-media-urls", "--enable-metrics",
        "--served-model-name", "tiny-vl", "--max-total-tokens", "4000", logs=tmp_path_factory,
    )  # fmt: skip


@pytest.fixture(scope="module")
def ref(model_dir: Path) -> Reference:
    return Reference(model_dir)


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url, "detail": "low"}}


def cases(host: ImageHost) -> dict[str, list[dict[str, Any]]]:
    return {
        "text": [SYSTEM, {"role": "user", "content": "Hello there"}],
        "one": [
            SYSTEM,
            {"role": "user", "content": [image_part(host.url("cat")), text_part("What?")]},
        ],
        "two": [
            SYSTEM,
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
            SYSTEM,
            {"role": "user", "content": [image_part(host.url("owl")), text_part("Describe.")]},
            {"role": "assistant", "content": "A bird."},
            {"role": "user", "content": "What colour?"},
        ],
    }


@pytest.mark.parametrize("case", ["text", "one", "two", "second_turn"])
def test_chat_greedy_matches_transformers(
    client: openai.OpenAI, ref: Reference, host: ImageHost, case: str
) -> None:
    messages = cases(host)[case]
    expected = ref.tok.decode(ref.greedy(messages), skip_special_tokens=True)
    resp = client.chat.completions.create(
        model="tiny-vl", messages=messages, max_tokens=N_NEW, temperature=0,  # type: ignore[arg-type]
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert resp.choices[0].message.content == expected
    assert resp.usage is not None and resp.usage.completion_tokens == N_NEW
    assert resp.usage.prompt_tokens == len(ref.prompt(messages)[0])


def test_streaming_with_an_image(client: openai.OpenAI, ref: Reference, host: ImageHost) -> None:
    messages = cases(host)["one"]
    stream = client.chat.completions.create(
        model="tiny-vl", messages=messages, max_tokens=N_NEW, temperature=0,  # type: ignore[arg-type]
        stream=True, extra_body={"ignore_eos": True},
    )  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == ref.tok.decode(ref.greedy(messages), skip_special_tokens=True)


def test_generate_with_image_data_gives_exact_ids(server: Server, ref: Reference) -> None:
    # The native route: a raw prompt with the template's placeholder, the image as a data URI.
    messages = [SYSTEM, {"role": "user", "content": [image_part("x/dog.png"), text_part("Hi")]}]
    text = ref.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    data_uri = "data:image/png;base64," + base64.b64encode(png("dog")).decode()
    body = {
        "text": text,
        "image_data": data_uri,
        "sampling_params": {"max_new_tokens": N_NEW, "temperature": 0, "ignore_eos": True},
    }
    out = httpx.post(server.base + "/generate", json=body, timeout=60).json()
    assert out["output_ids"] == ref.greedy(messages)


def test_same_image_hits_the_prefix_cache_and_skips_the_encoder(
    server: Server, client: openai.OpenAI, ref: Reference, host: ImageHost
) -> None:
    def ask(name: str, question: str) -> Any:
        msgs = [
            SYSTEM,
            {"role": "user", "content": [image_part(host.url(name)), text_part(question)]},
        ]
        r = client.chat.completions.create(
            model="tiny-vl",
            messages=msgs,
            max_tokens=2,
            temperature=0,  # type: ignore[arg-type]
        )
        assert r.usage is not None and r.usage.prompt_tokens_details is not None
        return r.usage.prompt_tokens_details.cached_tokens, ref.prompt(msgs)[0]

    server.wait_idle()
    encoded = server.stats()["images_encoded"]
    fetched = host.hits.get("/fox.png", 0)  # the host is shared by both models' servers
    ask("fox", "Is it big?")
    assert server.stats()["images_encoded"] == encoded + 1
    cached, ids = ask("fox", "Is it big?")
    # Everything but the last prompt token is cached, and the image is not encoded again, nor
    # fetched again (within --media-url-ttl, 60 s by default).
    assert cached == len(ids) - 1
    assert host.hits["/fox.png"] == fetched + 1
    assert server.stats()["images_encoded"] == encoded + 1
    # Same text and image size, another image: the hit stops where the image starts.
    cached, ids2 = ask("elk", "Is it big?")
    assert len(ids2) == len(ids) and cached == ids.index(ref.pad)
    assert server.stats()["images_encoded"] == encoded + 2
    s = server.wait_idle()
    assert s["free_slots"] + s["tree_slots"] == s["total_slots"]


def test_bad_images_get_400_and_the_server_goes_on(
    server: Server, client: openai.OpenAI, host: ImageHost
) -> None:
    def bad(url: str) -> openai.BadRequestError:
        msgs = [{"role": "user", "content": [image_part(url), text_part("?")]}]
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny-vl", messages=msgs, max_tokens=2)  # type: ignore[arg-type]
        return e.value

    assert "HTTP 404" in str(bad(host.url("nope")))
    assert "base64" in str(bad("data:image/png;base64,@@@"))
    assert "could not be decoded" in str(
        bad("data:image/png;base64," + base64.b64encode(b"x" * 64).decode())
    )
    assert "local image paths are disabled" in str(bad("/etc/passwd"))
    r = client.chat.completions.create(
        model="tiny-vl", max_tokens=2,
        messages=[{"role": "user", "content": [image_part(host.url("cat")), text_part("ok?")]}],  # type: ignore[list-item]
    )  # fmt: skip
    assert r.choices[0].finish_reason == "length"


def test_image_metrics(server: Server) -> None:
    """Runs last: the image counters agree with the scheduler's own figures."""
    import time

    from prometheus_client.parser import text_string_to_metric_families

    stats = server.wait_idle()
    time.sleep(1.5)  # the scheduler publishes once a second
    text = httpx.get(server.base + "/metrics", timeout=10).text
    m = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert m["fovea:images_encoded_total"] == stats["images_encoded"] > 0
    # Every image that reached the scheduler was preprocessed once in the tokenizer.
    assert m["fovea:image_preprocess_seconds_count"] == m["fovea:images_total"] > 0
    assert m["fovea:image_fetch_seconds_count"] >= 1
    assert 0 < m["fovea:image_cache_hit_rate"] < 1
    assert m["fovea:image_cache_bytes"] == stats["image_cache_bytes"] > 0
    # fox.png (at least) was served from the fetched-URL cache.
    urls = {
        s.labels["result"]: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "fovea:image_url_fetches_total"
    }
    assert urls["network"] >= 1 and urls["cache"] >= 1
