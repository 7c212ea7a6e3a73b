"""launch_server on the tiny Gemma 3 checkpoints with --chat-template gemma-it, driven by the
openai client with images from a local HTTP server: greedy outputs equal transformers' (its
processor and the checkpoint's own template) for text, one image, two images and a prompt
longer than the sliding window, with prefill chunks of 20 tokens (so images would straddle
them); the same image is a prefix hit; the text-only model serves too."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from PIL import Image
from server_harness import Server, serve_module
from vision_helpers import N_NEW, ImageHost, image_part, png, text_part

pytestmark = pytest.mark.slow

LONG = "The quick brown fox jumps over the lazy dog. " * 6 + "Serving needs batching."


class GemmaReference:
    """transformers on the same checkpoint: the tokenizer's own gemma-3-it template (image
    parts as {"type": "image"}), Gemma3Processor with its PIL image processor, greedy
    generate with token_type_ids (the bidirectional image mask)."""

    def __init__(self, model_dir: Path) -> None:
        import json

        import transformers
        from transformers import AutoTokenizer
        from transformers.models.gemma3 import Gemma3Processor
        from transformers.models.gemma3.image_processing_pil_gemma3 import (
            Gemma3ImageProcessorPil,
        )

        config = json.loads((model_dir / "config.json").read_text())
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.proc = None
        if "vision_config" in config:
            self.proc = Gemma3Processor(
                image_processor=Gemma3ImageProcessorPil.from_pretrained(model_dir),
                tokenizer=self.tok,
                image_seq_length=config["mm_tokens_per_image"],
            )
        arch = getattr(transformers, config["architectures"][0])
        self.model = arch.from_pretrained(model_dir, dtype=torch.float32).eval()

    def prompt(self, messages: list[dict[str, Any]]) -> tuple[list[int], dict[str, Any]]:
        names: list[str] = []
        hf_messages = []
        for m in messages:
            content = m["content"]
            if isinstance(content, list):
                parts = []
                for p in content:
                    if p["type"] == "image_url":
                        names.append(p["image_url"]["url"].rsplit("/", 1)[-1][: -len(".png")])
                        parts.append({"type": "image"})
                    else:
                        parts.append(p)
                content = parts
            hf_messages.append({**m, "content": content})
        text = self.tok.apply_chat_template(hf_messages, tokenize=False, add_generation_prompt=True)
        if not names:
            return self.tok.encode(text, add_special_tokens=False), {}
        assert self.proc is not None
        images = [Image.open(io.BytesIO(png(n))).convert("RGB") for n in names]
        out = self.proc(text=text, images=images, add_special_tokens=False, return_tensors="pt")
        kw = {"pixel_values": out["pixel_values"], "token_type_ids": out["token_type_ids"]}
        return out["input_ids"][0].tolist(), kw

    def greedy(self, messages: list[dict[str, Any]]) -> list[int]:
        ids, kw = self.prompt(messages)
        with torch.no_grad():
            out = self.model.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.int64),
                do_sample=False, max_new_tokens=N_NEW, min_new_tokens=N_NEW,
                eos_token_id=None, pad_token_id=0, **kw,
            )  # fmt: skip
        return [int(t) for t in out[0, len(ids) :]]


FLAGS = (
    "--chat-template", "gemma-it", "--allow-private-media-urls", "--served-model-name",
    "tiny-gemma", "--max-total-tokens", "4000", "--chunked-prefill-size", "20",
)  # fmt: skip


@pytest.fixture(scope="module")
def server(tiny_gemma3: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from serve_module(tiny_gemma3, *FLAGS, logs=tmp_path_factory)


@pytest.fixture(scope="module")
def ref(tiny_gemma3: Path) -> GemmaReference:
    return GemmaReference(tiny_gemma3)


def cases(host: ImageHost) -> dict[str, list[dict[str, Any]]]:
    return {
        "text": [{"role": "user", "content": "Paris is the capital of France."}],
        "one": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [image_part(host.url("cat")), text_part("What?")]},
        ],
        "two": [
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
        "long": [
            {"role": "user", "content": [image_part(host.url("owl")), text_part(LONG)]},
            {"role": "assistant", "content": "A bird."},
            {"role": "user", "content": "What colour?"},
        ],
    }


def chat(client: openai.OpenAI, messages: list[dict[str, Any]], n: int = N_NEW) -> Any:
    return client.chat.completions.create(
        model="tiny-gemma", messages=messages, max_tokens=n, temperature=0,  # type: ignore[arg-type]
        extra_body={"ignore_eos": True},
    )  # fmt: skip


@pytest.mark.parametrize("case", ["text", "one", "two", "long"])
def test_chat_greedy_matches_transformers(
    client: openai.OpenAI, ref: GemmaReference, host: ImageHost, case: str
) -> None:
    messages = cases(host)[case]
    ids = ref.prompt(messages)[0]
    if case == "long":
        assert len(ids) > 3 * 24  # several sliding windows
    expected = ref.tok.decode(ref.greedy(messages), skip_special_tokens=True)
    resp = chat(client, messages)
    assert resp.choices[0].message.content == expected
    assert resp.usage is not None and resp.usage.completion_tokens == N_NEW
    assert resp.usage.prompt_tokens == len(ids)


def test_streaming_with_two_images(
    client: openai.OpenAI, ref: GemmaReference, host: ImageHost
) -> None:
    messages = cases(host)["two"]
    stream = client.chat.completions.create(
        model="tiny-gemma", messages=messages, max_tokens=N_NEW, temperature=0,  # type: ignore[arg-type]
        stream=True, extra_body={"ignore_eos": True},
    )  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == ref.tok.decode(ref.greedy(messages), skip_special_tokens=True)


def test_same_image_hits_the_prefix_cache(
    server: Server, client: openai.OpenAI, ref: GemmaReference, host: ImageHost
) -> None:
    msgs = [{"role": "user", "content": [image_part(host.url("fox")), text_part("Big?")]}]
    server.wait_idle()
    encoded = server.stats()["images_encoded"]
    first = chat(client, msgs, 4).choices[0].message.content
    again = chat(client, msgs, 4)
    ids = ref.prompt(msgs)[0]
    assert again.usage.prompt_tokens_details.cached_tokens == len(ids) - 1
    assert again.choices[0].message.content == first
    assert server.stats()["images_encoded"] == encoded + 1
    s = server.wait_idle()
    assert s["free_slots"] + s["tree_slots"] == s["total_slots"]


def test_long_prompt_hit_and_both_pools_in_server_info(
    server: Server, client: openai.OpenAI, ref: GemmaReference, host: ImageHost
) -> None:
    """The sliding-window layers' pool (window 24; 0.8 x 4000 slots): the "long" conversation
    again hits all its prompt but the last token, whose window the first run kept, and gives
    the same answer; /get_server_info shows both pools, each free or in the tree when idle,
    and /flush_cache frees both."""
    messages = cases(host)["long"]
    ids = ref.prompt(messages)[0]
    first = chat(client, messages)
    again = chat(client, messages)
    assert again.usage is not None and again.usage.prompt_tokens_details is not None
    assert again.usage.prompt_tokens_details.cached_tokens == len(ids) - 1
    assert again.choices[0].message.content == first.choices[0].message.content
    server.wait_idle()
    pools = httpx.get(server.base + "/get_server_info", timeout=10).json()["scheduler"]["kv_pools"]
    glob, local = pools["global"], pools["local"]
    assert (glob["total_slots"], local["total_slots"], local["sliding_window"]) == (4000, 3200, 24)
    # K and V of 2 KV heads x 32 in float32 (tests/conftest.py's FOVEA_DTYPE): 1 full layer in
    # the global pool, 2 sliding ones in the local pool.
    assert (glob["kind"], glob["bytes_per_token"]) == ("kv", 2 * 1 * 2 * 32 * 4)
    assert (local["kind"], local["bytes_per_token"]) == ("kv", 2 * 2 * 2 * 32 * 4)
    assert local["freed_early"] > 0
    for pool in (glob, local):
        assert pool["free_slots"] + pool["tree_slots"] == pool["total_slots"]
        assert pool["used_slots"] == pool["tree_slots"] > 0
    httpx.post(server.base + "/flush_cache", timeout=10).raise_for_status()
    s = server.stats()
    assert (s["free_slots"], s["local_free_slots"]) == (4000, 3200)
    assert (s["tree_slots"], s["local_tree_slots"]) == (0, 0)


def test_text_only_model(tiny_gemma3_text: Path, tmp_path: Path) -> None:
    ref = GemmaReference(tiny_gemma3_text)
    srv = Server(tiny_gemma3_text, *FLAGS, log_path=tmp_path / "server.log").wait_ready()
    try:
        client = openai.OpenAI(base_url=srv.base + "/v1", api_key="none", max_retries=0)
        messages = [{"role": "user", "content": LONG}]
        expected = ref.tok.decode(ref.greedy(messages), skip_special_tokens=True)
        assert chat(client, messages).choices[0].message.content == expected
        with pytest.raises(openai.BadRequestError, match="does not accept image inputs"):
            chat(client, [{"role": "user", "content": [image_part("http://x/cat.png")]}], 2)
    finally:
        assert srv.stop() == 0, srv.log_tail()
