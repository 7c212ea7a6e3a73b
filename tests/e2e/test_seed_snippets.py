"""The seed document (SPEC-openai-vision.md, SGLang's vision tutorial) run as a user would run
it: its launch command on the hub id meta-llama/Llama-3.2-11B-Vision-Instruct, read OFFLINE from
a Hugging Face cache, and its four client snippets (curl, requests, the openai client with one
image, with two images), each copied here as it stands in the seed.

The repo id holds the tiny random Mllama checkpoint (tests/fixtures/tiny_mllama.py).
huggingface_hub's own snapshot_download lays out the cache under a temporary HF_HOME, from the
stand-in hub (tests/fixtures/stand_in_hub.py, HF_ENDPOINT); the hub is then shut down and the
server started with HF_HUB_OFFLINE=1 and that HF_HOME:

    python -m fovea.launch_server --model-path meta-llama/Llama-3.2-11B-Vision-Instruct \
        --chat-template=llama_3_vision --port <free port> --allow-private-media-urls

(`--port`: the seed's launch_server_cmd picks a free port too; `--allow-private-media-urls`:
the images below are served on loopback, which is refused by default.)

The snippets' text is the seed's but for two things:
- `{port}` is this test server's port (the seed's launch_server_cmd returns it the same way);
- the image URLs' origins, https://github.com and https://raw.githubusercontent.com, which
  this machine cannot reach (no internet), are `{github}` and `{raw_githubusercontent}`: a
  local HTTP server started here that answers the same paths (query included) with a PNG made
  by PIL, example_image.png (RGB) and logo.png (RGBA, as a logo with a transparent background
  is), and counts the GETs of each path.
`print_highlight` (sglang.utils) is a print here. The curl snippet sends no Content-Type
header of its own (curl -d sends application/x-www-form-urlencoded): the server must read the
body as JSON anyway, as SGLang does.

The seed's requests set no temperature (sampling at 1.0), so their texts are not compared;
their prompt token counts are, exactly: with the checkpoint's tokenizer and chat template
(equal to llama_3_vision), one `<|image|>` token per image.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
import requests
from openai import OpenAI
from PIL import Image
from server_harness import Server, serve_module
from stand_in_hub import StandInHub

pytestmark = pytest.mark.slow

REPO = "meta-llama/Llama-3.2-11B-Vision-Instruct"
COMMIT = hashlib.sha1(b"seed-snippets").hexdigest()
EXAMPLE_IMAGE_PATH = "/sgl-project/sglang/blob/main/test/lang/example_image.png?raw=true"
LOGO_PATH = "/sgl-project/sglang/main/assets/logo.png"
MAX_TOKENS = 300  # the seed's max_tokens in its first three requests


def print_highlight(html_content: str) -> None:
    """sglang.utils.print_highlight, which the seed imports in its launch cell."""
    print(html_content)


def _png(mode: str, size: tuple[int, int], seed: int) -> bytes:
    """A PNG of random pixels; an RGBA one has a transparent band down its left side."""
    w, h = size
    channels = len(mode)
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)
    if mode == "RGBA":
        pixels[..., 3] = 255
        pixels[:, : w // 4, 3] = 0
    buf = io.BytesIO()
    Image.fromarray(pixels, mode).save(buf, format="PNG")
    return buf.getvalue()


IMAGES = {
    "example_image.png": _png("RGB", (96, 64), 1),
    "logo.png": _png("RGBA", (80, 40), 2),
}


class ImageOrigin:
    """Stands in for github.com and raw.githubusercontent.com: GET of any path whose last
    segment names one of IMAGES returns it; `hits` counts GETs per request target."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = {}
        origin = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                origin.hits[self.path] = origin.hits.get(self.path, 0) + 1
                body = IMAGES.get(urlsplit(self.path).path.rsplit("/", 1)[-1])
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"


# --- the seed's snippets -----------------------------------------------------------------------


def curl_snippet(port: int, github: str) -> list[str]:
    """The seed's "Using cURL" cell, which runs the command twice: both responses."""
    curl_command = f"""
curl -s http://localhost:{port}/v1/chat/completions \\
 -d '{{
 "model": "meta-llama/Llama-3.2-11B-Vision-Instruct",
 "messages": [
 {{
 "role": "user",
 "content": [
 {{
 "type": "text",
 "text": "What’s in this image?"
 }},
 {{
 "type": "image_url",
 "image_url": {{
 "url": "{github}/sgl-project/sglang/blob/main/test/lang/example_image.png?raw=true"
 }}
 }}
 ]
 }}
 ],
 "max_tokens": 300
 }}'
"""

    response = subprocess.check_output(curl_command, shell=True).decode()
    print_highlight(response)
    first = response

    response = subprocess.check_output(curl_command, shell=True).decode()
    print_highlight(response)
    return [first, response]


def requests_snippet(port: int, github: str) -> requests.Response:
    """The seed's "Using Python Requests" cell."""
    url = f"http://localhost:{port}/v1/chat/completions"

    data = {
        "model": "meta-llama/Llama-3.2-11B-Vision-Instruct",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What’s in this image?"},
                    {
                        "type": "image_url",
                        "image_url": {
                            "url": f"{github}/sgl-project/sglang/blob/main/test/lang/example_image.png?raw=true"
                        },
                    },
                ],
            }
        ],
        "max_tokens": 300,
    }

    response = requests.post(url, json=data)
    print_highlight(response.text)
    return response


def openai_snippet(port: int, github: str) -> Any:
    """The seed's "Using OpenAI Python Client" cell."""
    client = OpenAI(base_url=f"http://localhost:{port}/v1", api_key="None")

    response = client.chat.completions.create(
        model="meta-llama/Llama-3.2-11B-Vision-Instruct",
        messages=[
            {
                "role": "user",
                "content": [
                    {
                        "type": "text",
                        "text": "What is in this image?",
                    },
                    {
                        "type": "image_url",
                        "image_url": {
                            "url": f"{github}/sgl-project/sglang/blob/main/test/lang/example_image.png?raw=true"
                        },
                    },
                ],
            }
        ],
        max_tokens=300,
    )

    print_highlight(response.choices[0].message.content)
    return response


def two_images_snippet(port: int, github: str, raw_githubusercontent: str) -> Any:
    """The seed's "Multiple-Image Inputs" cell."""
    client = OpenAI(base_url=f"http://localhost:{port}/v1", api_key="None")

    response = client.chat.completions.create(
        model="meta-llama/Llama-3.2-11B-Vision-Instruct",
        messages=[
            {
                "role": "user",
                "content": [
                    {
                        "type": "image_url",
                        "image_url": {
                            "url": f"{github}/sgl-project/sglang/blob/main/test/lang/example_image.png?raw=true",
                        },
                    },
                    {
                        "type": "image_url",
                        "image_url": {
                            "url": f"{raw_githubusercontent}/sgl-project/sglang/main/assets/logo.png",
                        },
                    },
                    {
                        "type": "text",
                        "text": "I have two very different images. They are not related at all. "
                        "Please describe the first image in one sentence, and then describe the second image in another sentence.",
                    },
                ],
            }
        ],
        temperature=0,
    )

    print_highlight(response.choices[0].message.content)
    return response


# --- the cache, the server, the images ---------------------------------------------------------


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def snapshot(tiny_mllama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The HF cache's snapshot of REPO under a temporary HF_HOME, written by huggingface_hub's
    snapshot_download from the stand-in hub, which is shut down afterwards."""
    hf_home = tmp_path_factory.mktemp("hf-home").resolve()
    hub = StandInHub({REPO: {"main": (COMMIT, tiny_mllama)}})
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.lower().endswith("_proxy") and not k.startswith(("HF_", "HUGGINGFACE_"))
    }
    env.update(HF_HOME=str(hf_home), HF_ENDPOINT=hub.url)
    download = f"from huggingface_hub import snapshot_download; print(snapshot_download({REPO!r}))"
    try:
        out = subprocess.run(
            [sys.executable, "-c", download], capture_output=True, text=True, timeout=120, env=env
        )
    finally:
        hub.shutdown()
        hub.server_close()
    assert out.returncode == 0, out.stderr
    path = hf_home / "hub" / "models--meta-llama--Llama-3.2-11B-Vision-Instruct" / "snapshots"
    assert out.stdout.splitlines()[-1] == str(path / COMMIT)
    assert _files(path / COMMIT) == _files(tiny_mllama)
    return path / COMMIT


@pytest.fixture(scope="module")
def server(snapshot: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    hf_home = snapshot.parents[3]
    env = {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    if {"HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"} & set(os.environ):
        env["HF_HUB_CACHE"] = str(hf_home / "hub")  # a cache of the caller's would win
    yield from serve_module(
        REPO, "--chat-template=llama_3_vision", "--allow-private-media-urls",
        logs=tmp_path_factory, env=env,
    )  # fmt: skip


@pytest.fixture(scope="module")
def origin() -> Iterator[ImageOrigin]:
    o = ImageOrigin()
    yield o
    o.httpd.shutdown()
    o.httpd.server_close()


@pytest.fixture(scope="module")
def prompt_tokens(snapshot: Path) -> dict[str, int]:
    """Prompt lengths by the checkpoint's tokenizer and own chat template (images as
    {"type": "image"} parts, one <|image|> token each; the rendered text has its BOS)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(snapshot))
    image = {"type": "image"}
    two = (
        "I have two very different images. They are not related at all. Please describe the "
        "first image in one sentence, and then describe the second image in another sentence."
    )
    contents = {
        "What’s": [{"type": "text", "text": "What’s in this image?"}, image],
        "What is": [{"type": "text", "text": "What is in this image?"}, image],
        "two images": [image, image, {"type": "text", "text": two}],
    }
    out = {}
    for name, content in contents.items():
        text = tok.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        out[name] = len(tok.encode(text, add_special_tokens=False))
    return out


@pytest.fixture(scope="module")
def curl_responses(server: Server, origin: ImageOrigin) -> list[dict[str, Any]]:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed: the seed's cURL snippet cannot run")
    return [json.loads(r) for r in curl_snippet(server.port, origin.url)]


@pytest.fixture(scope="module")
def requests_response(server: Server, origin: ImageOrigin) -> dict[str, Any]:
    response = requests_snippet(server.port, origin.url)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.fixture(scope="module")
def openai_response(server: Server, origin: ImageOrigin) -> dict[str, Any]:
    body: dict[str, Any] = openai_snippet(server.port, origin.url).model_dump()
    return body


def check_completion(body: dict[str, Any], max_tokens: int | None) -> None:
    """What every seed request must get back: one assistant choice of the served hub id,
    finished by a stop token or the token limit, usage adding up."""
    assert body.get("object") == "chat.completion", body  # an error object shows itself
    assert body["model"] == REPO
    assert len(body["choices"]) == 1
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in {"stop", "length"}
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    if max_tokens is not None:
        assert usage["completion_tokens"] <= max_tokens
        if choice["finish_reason"] == "length":
            assert usage["completion_tokens"] == max_tokens


# --- the tests --------------------------------------------------------------------------------


def test_curl_snippet(curl_responses: list[dict[str, Any]], prompt_tokens: dict[str, int]) -> None:
    """No Content-Type of its own: the body is read as JSON. (curl -s shows no status; an error
    would be an error object, not a chat.completion.)"""
    for body in curl_responses:
        check_completion(body, MAX_TOKENS)
        assert body["usage"]["prompt_tokens"] == prompt_tokens["What’s"]


def test_requests_snippet(requests_response: dict[str, Any], prompt_tokens: dict[str, int]) -> None:
    check_completion(requests_response, MAX_TOKENS)
    assert requests_response["usage"]["prompt_tokens"] == prompt_tokens["What’s"]


def test_curl_and_requests_snippets_send_the_same_prompt(
    curl_responses: list[dict[str, Any]], requests_response: dict[str, Any]
) -> None:
    """Same messages, so the same prompt; sampled at temperature 1.0, so the texts may differ."""
    counts = [b["usage"]["prompt_tokens"] for b in [*curl_responses, requests_response]]
    assert counts == [requests_response["usage"]["prompt_tokens"]] * 3


def test_openai_snippet(openai_response: dict[str, Any], prompt_tokens: dict[str, int]) -> None:
    check_completion(openai_response, MAX_TOKENS)
    assert openai_response["usage"]["prompt_tokens"] == prompt_tokens["What is"]


def test_two_images_snippet_fetches_both(
    server: Server, origin: ImageOrigin, prompt_tokens: dict[str, int]
) -> None:
    """Greedy (temperature 0) with no max_tokens: up to the context's end. Each of the two URLs
    is fetched at most once for the request: example_image.png, which the snippets before asked
    for, may come from the fetched-URL cache (--media-url-ttl); logo.png is new."""
    before = dict(origin.hits)
    body: dict[str, Any] = two_images_snippet(server.port, origin.url, origin.url).model_dump()
    fetched = {p: n - before.get(p, 0) for p, n in origin.hits.items() if n != before.get(p, 0)}
    assert fetched in ({EXAMPLE_IMAGE_PATH: 1, LOGO_PATH: 1}, {LOGO_PATH: 1})
    check_completion(body, None)
    assert body["usage"]["prompt_tokens"] == prompt_tokens["two images"]


def test_models_lists_the_hub_id(server: Server) -> None:
    r = requests.get(f"http://localhost:{server.port}/v1/models")
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == [REPO]


def test_the_snapshot_path_names_the_model_and_another_name_is_404(
    server: Server, snapshot: Path
) -> None:
    url = f"http://localhost:{server.port}/v1/chat/completions"
    request = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}
    r = requests.post(url, json={"model": str(snapshot), **request})
    assert r.status_code == 200, r.text
    check_completion(r.json(), 2)
    r = requests.post(url, json={"model": "other", **request})
    assert r.status_code == 404
    assert r.json()["error"]["message"] == "The model `other` does not exist."
