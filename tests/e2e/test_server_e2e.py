"""launch_server as a subprocess on a tiny random Llama, driven by the real openai client,
httpx and raw sockets. Greedy outputs are compared with transformers on the same files."""

from __future__ import annotations

import concurrent.futures as cf
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from server_harness import Server, serve_module

pytestmark = pytest.mark.slow

MODEL = "tiny"


@pytest.fixture(scope="module")
def server(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from serve_module(
        tiny_llama, "--served-model-name", MODEL, "--max-total-tokens", "3000",
        "--chunked-prefill-size", "64", logs=tmp_path_factory,
    )  # fmt: skip


@pytest.fixture(scope="module")
def hf(tiny_llama: Path):  # type: ignore[no-untyped-def]
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()

    def greedy(messages: list[dict[str, str]], n: int) -> list[int]:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
        return [int(t) for t in out[0, len(ids) :]]

    greedy.tokenizer = tok  # type: ignore[attr-defined]
    return greedy


def assert_idle_no_leak(server: Server) -> None:
    s = server.wait_idle()
    assert s["free_slots"] + s["tree_slots"] == s["total_slots"], s


MSG = [{"role": "user", "content": "The quick brown fox"}]


def test_models_and_info(server: Server, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    info = httpx.get(server.base + "/get_model_info").json()
    assert info["served_model_name"] == MODEL
    assert info["context_length"] == 1024
    assert httpx.get(server.base + "/health_generate", timeout=30).status_code == 200


def test_chat_greedy_matches_transformers(server: Server, client: openai.OpenAI, hf) -> None:  # type: ignore[no-untyped-def]
    r = client.chat.completions.create(
        model=MODEL, messages=MSG, max_tokens=32, temperature=0, extra_body={"ignore_eos": True}
    )
    expected_ids = hf(MSG, 32)
    expected = hf.tokenizer.decode(expected_ids, skip_special_tokens=True)
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 32
    prompt = hf.tokenizer.apply_chat_template(MSG, tokenize=False, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(hf.tokenizer(prompt, add_special_tokens=False)["input_ids"])


def test_generate_native_ids_match_transformers(server: Server, hf) -> None:  # type: ignore[no-untyped-def]
    tok = hf.tokenizer
    prompt = tok.apply_chat_template(MSG, tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    body = {
        "input_ids": ids,
        "sampling_params": {"max_new_tokens": 32, "temperature": 0, "ignore_eos": True},
    }
    out = httpx.post(server.base + "/generate", json=body, timeout=60).json()
    assert out["output_ids"] == hf(MSG, 32)
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 32}
    assert out["meta_info"]["prompt_tokens"] == len(ids)


def test_stream_equals_non_stream(client: openai.OpenAI) -> None:
    kw = dict(model=MODEL, messages=MSG, max_tokens=24, temperature=0)
    full = client.chat.completions.create(**kw)  # type: ignore[call-overload]
    chunks = list(
        client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})  # type: ignore[call-overload]
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_n_and_seed(client: openai.OpenAI) -> None:
    kw = dict(
        model=MODEL, messages=MSG, max_tokens=12, temperature=1.0, seed=1234, n=3,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    a = client.chat.completions.create(**kw)  # type: ignore[call-overload]
    b = client.chat.completions.create(**kw)  # type: ignore[call-overload]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert [c.finish_reason for c in a.choices] == ["length"] * 3
    assert a.usage.completion_tokens == 36


def test_stop_string(client: openai.OpenAI) -> None:
    kw = dict(
        model=MODEL, messages=MSG, max_tokens=32, temperature=0, extra_body={"ignore_eos": True}
    )
    full = client.chat.completions.create(**kw).choices[0].message.content  # type: ignore[call-overload]
    assert full and len(full) > 10
    stop = full[5:8]
    cut = full[: full.index(stop)]
    r = client.chat.completions.create(**kw, stop=[stop])  # type: ignore[call-overload]
    assert r.choices[0].message.content == cut
    assert r.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(**kw, stop=[stop], stream=True)  # type: ignore[call-overload]
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == cut


def test_concurrent_requests_match_solo(client: openai.OpenAI) -> None:
    prompts = [f"Paris number {i} and the lazy dog" for i in range(8)]

    def ask(p: str) -> str:
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": p}], max_tokens=20, temperature=0
        )
        return r.choices[0].message.content or ""

    solo = [ask(p) for p in prompts]
    with cf.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, prompts))
    assert together == solo


def test_completions_prompt_forms_and_logprobs(client: openai.OpenAI, hf) -> None:  # type: ignore[no-untyped-def]
    tok = hf.tokenizer
    ids = tok("The quick brown")["input_ids"]
    by_text = client.completions.create(
        model=MODEL, prompt="The quick brown", max_tokens=8, temperature=0
    )
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    assert by_text.choices[0].text == by_ids.choices[0].text
    r = client.completions.create(
        model=MODEL, prompt="The quick brown", max_tokens=4, temperature=0, logprobs=3
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 4 and len(lp.token_logprobs) == 4
    assert all(len(t) == 3 for t in lp.top_logprobs)
    # Greedy: the chosen token is the most likely one.
    assert all(
        max(t.values()) == pytest.approx(c, abs=1e-5)
        for t, c in zip(lp.top_logprobs, lp.token_logprobs, strict=True)
    )
    batch = client.completions.create(
        model=MODEL, prompt=["a b", "c d"], max_tokens=3, temperature=0
    )
    assert [c.index for c in batch.choices] == [0, 1]


BAD_REQUESTS = [
    ("malformed json", b"{not json", 400),
    ("missing messages", {"model": MODEL}, 400),
    ("empty messages", {"model": MODEL, "messages": []}, 400),
    ("wrong type", {"model": MODEL, "messages": MSG, "temperature": "hot"}, 400),
    ("unknown role", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400),
    ("unknown model", {"model": "gpt-9", "messages": MSG}, 404),
    ("max_tokens 0", {"model": MODEL, "messages": MSG, "max_tokens": 0}, 400),
    ("negative temperature", {"model": MODEL, "messages": MSG, "temperature": -1}, 400),
    ("n zero", {"model": MODEL, "messages": MSG, "n": 0}, 400),
    (
        "prompt too long",
        {"model": MODEL, "messages": [{"role": "user", "content": "fox " * 3000}]},
        400,
    ),
    ("too many tokens", {"model": MODEL, "messages": MSG, "max_tokens": 5000}, 400),
    ("top_p zero", {"model": MODEL, "messages": MSG, "top_p": 0}, 400),
]


@pytest.mark.parametrize("name,body,status", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests(
    server: Server, client: openai.OpenAI, name: str, body: object, status: int
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(
        server.base + "/v1/chat/completions", content=content,
        headers={"content-type": "application/json"}, timeout=30,
    )  # fmt: skip
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    # The next good request still works, and nothing leaked.
    ok = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=2, temperature=0)
    assert ok.choices[0].finish_reason in ("length", "stop")
    assert_idle_no_leak(server)


def test_disconnect_mid_stream_frees_slots(server: Server) -> None:
    body = {
        "model": MODEL, "messages": MSG, "max_tokens": 900, "temperature": 0,
        "ignore_eos": True, "stream": True,
    }  # fmt: skip
    with httpx.stream("POST", server.base + "/v1/chat/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
    assert_idle_no_leak(server)


def test_disconnect_non_stream_frees_slots(server: Server) -> None:
    body = {
        "model": MODEL,
        "messages": MSG,
        "max_tokens": 900,
        "temperature": 0,
        "ignore_eos": True,
    }
    # The client gives up 50 ms into a generation of 900 tokens (hundreds of ms even for the
    # tiny model on a fast CPU): the server sees the disconnect mid-generation.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base + "/v1/chat/completions", json=body,
                   timeout=httpx.Timeout(10, read=0.05))  # fmt: skip
    assert_idle_no_leak(server)
