"""launch_server on tiny random Qwen2-VL and Qwen2.5-VL checkpoints with --chat-template
qwen2-vl, driven by the openai client with images from a local HTTP server: greedy outputs equal
transformers' on the same images, the prefix cache tells images apart, and image inputs the
server must refuse get a 400 without harming the next request."""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import torch
from PIL import Image
from server_harness import Server

pytestmark = pytest.mark.slow

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
# (width, height); fox and elk are used by one test only, so they start cold there.
SIZES = {"cat": (64, 48), "dog": (40, 90), "owl": (56, 56), "fox": (50, 60), "elk": (50, 60)}
N_NEW = 32


def png(name: str) -> bytes:
    w, h = SIZES[name]
    rng = np.random.default_rng(sum(map(ord, name)))
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


class ImageHost:
    """GET /<name>.png from a thread; counts requests per path."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = {}
        host = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                host.hits[self.path] = host.hits.get(self.path, 0) + 1
                name = self.path.strip("/").removesuffix(".png")
                if name not in SIZES:
                    self.send_error(404)
                    return
                body = png(name)
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}.png"


@pytest.fixture(scope="module")
def host() -> Iterator[ImageHost]:
    h = ImageHost()
    yield h
    h.httpd.shutdown()


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def model_dir(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(f"tiny_{request.param}")  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("logs") / "server.log"
    srv = Server(
        model_dir, "--chat-template", "qwen2-vl", "--allow-private-media-urls",
        "--served-model-name", "tiny-vl", "--max-total-tokens", "4000", log_path=log,
    )  # fmt: skip
    try:
        yield srv.wait_ready()
    finally:
        assert srv.stop() == 0, srv.log_tail()


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base + "/v1", api_key="none", max_retries=0)


class Reference:
    """transformers on the same checkpoint: the fixture tokenizer's own chat template, its PIL
    image processor, greedy generate on M-RoPE positions."""

    def __init__(self, model_dir: Path) -> None:
        import json

        import transformers
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil,
        )

        arch = json.loads((model_dir / "config.json").read_text())["architectures"][0]
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.proc = Qwen2VLImageProcessorPil.from_pretrained(model_dir)
        self.model = getattr(transformers, arch).from_pretrained(model_dir, dtype=torch.float32)
        self.pad = self.tok.convert_tokens_to_ids("<|image_pad|>")

    def prompt(self, messages: list[dict[str, Any]]) -> tuple[list[int], dict[str, Any]]:
        """Expanded prompt ids and the image tensors; image parts name SIZES keys."""
        names = [
            p["image_url"]["url"].rsplit("/", 1)[-1].removesuffix(".png")
            for m in messages if isinstance(m["content"], list)
            for p in m["content"] if p["type"] == "image_url"
        ]  # fmt: skip
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids: list[int] = []
        pixels, grids = [], []
        for t in self.tok.encode(text, add_special_tokens=False):
            if t != self.pad:
                ids.append(t)
                continue
            image = Image.open(io.BytesIO(png(names[len(grids)])))
            feats = self.proc(images=[image], return_tensors="np")
            pixels.append(feats["pixel_values"])
            grids.append([int(g) for g in feats["image_grid_thw"][0]])
            ids.extend([self.pad] * (int(np.prod(grids[-1])) // 4))
        kw: dict[str, Any] = {}
        if grids:
            kw = {
                "pixel_values": torch.from_numpy(np.concatenate(pixels)),
                "image_grid_thw": torch.tensor(grids),
                "mm_token_type_ids": torch.tensor([[int(t == self.pad) for t in ids]]),
            }
        return ids, kw

    def greedy(self, messages: list[dict[str, Any]]) -> list[int]:
        ids, kw = self.prompt(messages)
        with torch.no_grad():
            out = self.model.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.int64),
                do_sample=False, max_new_tokens=N_NEW, min_new_tokens=N_NEW,
                eos_token_id=None, pad_token_id=0, **kw,
            )  # fmt: skip
        return [int(t) for t in out[0, len(ids) :]]


@pytest.fixture(scope="module")
def ref(model_dir: Path) -> Reference:
    return Reference(model_dir)


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url, "detail": "low"}}


def text_part(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


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
    ask("fox", "Is it big?")
    assert server.stats()["images_encoded"] == encoded + 1
    cached, ids = ask("fox", "Is it big?")
    # Everything but the last prompt token is cached, and the image is not encoded again.
    assert cached == len(ids) - 1
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
