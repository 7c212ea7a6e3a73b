"""Structured output on a tiny random-weight checkpoint of every vision-language family, served
with its chat template and given an image: random weights write schema-valid JSON only if every
step's mask is right. The schema is finite (bounded integer, enums, a boolean, all required,
nothing else allowed), so every path through it ends within max_tokens: each answer must parse,
validate and stop on EOS. One sampled and one greedy request per family; DeepSeek-VL2 runs with
--tp-size 2, so both ranks apply the same masks."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
from server_harness import Server, serve_module
from vision_helpers import png

pytestmark = pytest.mark.slow

MODEL = "tiny-vlm"
SCHEMA = {
    "type": "object",
    "properties": {
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
        "color": {"enum": ["red", "green", "blue"]},
        "outdoor": {"type": "boolean"},
    },
    "required": ["count", "color", "outdoor"],
    "additionalProperties": False,
}
# family -> (its tiny checkpoint fixture, the flags its e2e test serves it with)
FAMILIES = {
    "qwen2_vl": ("tiny_qwen2_vl", ("--chat-template", "qwen2-vl")),
    "qwen2_5_vl": ("tiny_qwen2_5_vl", ("--chat-template", "qwen2-vl")),
    "gemma3": ("tiny_gemma3", ("--chat-template", "gemma-it", "--chunked-prefill-size", "20")),
    "llava": ("tiny_llava", ("--chat-template", "vicuna_v1.1")),
    "llava_next": ("tiny_llava_next", ("--chat-template", "vicuna_v1.1")),
    "llava_onevision": ("tiny_llava_onevision", ("--chat-template", "chatml-llava")),
    "mllama": ("tiny_mllama", ("--chat-template", "llama_3_vision")),
    "minicpmv": ("tiny_minicpmv", ("--chat-template", "minicpmv")),
    "minicpmv4_6": ("tiny_minicpmv4_6", ("--chat-template", "{dir}/chat_template.jinja")),
    "deepseek_vl2": ("tiny_deepseek_vl2", ("--chat-template", "deepseek-vl2", "--tp-size", "2")),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    pytest.importorskip("xgrammar")
    fixture, flags = FAMILIES[request.param]
    model_dir: Path = request.getfixturevalue(fixture)
    yield from serve_module(
        model_dir, *(f.format(dir=model_dir) for f in flags), "--served-model-name", MODEL,
        "--max-total-tokens", "4000", logs=tmp_path_factory,
    )  # fmt: skip


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_schema_valid_json_with_an_image(server: Server, temperature: float) -> None:
    url = "data:image/png;base64," + base64.b64encode(png("cat")).decode()
    r = server.openai_client().chat.completions.create(
        model=MODEL,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "Describe the image as JSON."},
                ],
            }
        ],
        temperature=temperature,
        seed=3,
        max_tokens=64,
        response_format={"type": "json_schema", "json_schema": {"name": "d", "schema": SCHEMA}},
    )
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content or ""), SCHEMA)
