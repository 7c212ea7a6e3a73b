"""What SGLang's and vLLM's users expect of the HTTP API, on a tiny random Llama served by
launch_server: bodies parsed as JSON whatever the Content-Type, unsupported fields refused by
name, `reasoning_content`, /v1/models/{id}, continuous usage, continue_final_message, echo,
several streamed prompts, SGLang's /generate shape and logprobs, /flush_cache, /get_server_info.
Values are compared with transformers on the same files where the model decides them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from server_harness import Server, serve_module

pytestmark = pytest.mark.slow

MODEL = "tiny"
MSG = [{"role": "user", "content": "The quick brown fox"}]
CHAT, COMPLETIONS, GENERATE = "/v1/chat/completions", "/v1/completions", "/generate"


@pytest.fixture(scope="module")
def server(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from serve_module(
        tiny_llama, "--served-model-name", MODEL, "--max-total-tokens", "3000",
        "--chunked-prefill-size", "16", logs=tmp_path_factory,
    )  # fmt: skip


@pytest.fixture(scope="module")
def hf(tiny_llama: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    return tok, model


def _greedy(hf: Any, ids: list[int], n: int) -> list[int]:
    import torch

    _, model = hf
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None
        )
    return [int(t) for t in out[0, len(ids) :]]


def _prompt_logprobs(hf: Any, ids: list[int]) -> list[float]:
    """logprob of ids[i] given ids[:i], for i >= 1 (float32 reference)."""
    import torch

    _, model = hf
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits[:-1], dim=-1)
    return [float(lp[i, t]) for i, t in enumerate(ids[1:])]


def _sse(response: httpx.Response) -> list[dict[str, Any]]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            events.append(json.loads(line[len("data: ") :]))
    return events


# ---------------------------------------------------------------- request bodies


@pytest.mark.parametrize(
    "content_type", [None, "application/x-www-form-urlencoded", "text/plain; charset=utf-8"]
)
@pytest.mark.parametrize("path", [CHAT, COMPLETIONS, GENERATE])
def test_json_body_whatever_the_content_type(
    server: Server, path: str, content_type: str | None
) -> None:
    body = {
        CHAT: {"messages": MSG, "max_tokens": 3, "temperature": 0, "ignore_eos": True},
        COMPLETIONS: {"prompt": "a b", "max_tokens": 3, "temperature": 0, "ignore_eos": True},
        GENERATE: {"text": "a b", "sampling_params": {"max_new_tokens": 3, "ignore_eos": True}},
    }[path]
    headers = {} if content_type is None else {"content-type": content_type}
    # httpx's content= sends no Content-Type of its own.
    r = httpx.post(server.base + path, content=json.dumps(body), headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    out = r.json()
    tokens = (
        out["meta_info"]["completion_tokens"]
        if path == GENERATE
        else out["usage"]["completion_tokens"]
    )
    assert tokens == 3


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS, GENERATE])
def test_a_body_that_is_not_json_names_the_position(server: Server, path: str) -> None:
    r = httpx.post(server.base + path, content=b'{"max_tokens": 3,, }', timeout=10)
    assert r.status_code == 400
    assert r.json()["error"]["message"] == (
        "invalid JSON in the request body at position 17: "
        "Expecting property name enclosed in double quotes"
    )


# ---------------------------------------------------------------- fields Fovea does not implement


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"frobnicate": 1}, "frobnicate"),
        ({"guided_json": {"type": "object"}}, "guided_json"),  # vLLM's; ours is response_format
    ],
)
def test_unsupported_chat_fields_are_refused_by_name(
    server: Server, extra: dict[str, Any], param: str
) -> None:
    body = {"messages": MSG, "max_tokens": 2, **extra}
    r = httpx.post(server.base + CHAT, json=body, timeout=10)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == param
    assert err["message"].startswith(f"unsupported parameter: {param}")
    assert err["message"].endswith(
        "(Fovea does not implement it; fields accepted and ignored: metadata, service_tier, "
        "store, user)"
    )


def test_ignored_and_null_fields_pass(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=MSG, max_tokens=2, user="u1", metadata={"k": "v"}, store=False,
        response_format={"type": "text"}, extra_body={"tools": None, "ignore_eos": True},
    )  # fmt: skip
    assert r.usage is not None and r.usage.completion_tokens == 2


def test_unsupported_generate_and_completion_fields(server: Server) -> None:
    r = httpx.post(server.base + COMPLETIONS, json={"prompt": "a", "best_of": 2}, timeout=10)
    assert (r.status_code, r.json()["error"]["param"]) == (400, "best_of")
    r = httpx.post(server.base + GENERATE, json={"text": "a", "lora_path": "x"}, timeout=10)
    assert r.status_code == 400
    assert r.json()["error"]["message"] == (
        "unsupported parameter: lora_path (Fovea does not implement it)"
    )


# ---------------------------------------------------------------- chat shapes


def test_reasoning_content_is_null_in_messages_and_every_delta(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=3)
    msg = r.choices[0].message.model_dump()
    assert (msg["reasoning_content"], msg["tool_calls"]) == (None, None)
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=MSG, max_tokens=3, n=2, stream=True,
            extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    assert chunks and all("reasoning_content" in c.choices[0].delta.model_extra for c in chunks)
    assert {c.choices[0].delta.reasoning_content for c in chunks} == {None}
    # n > 1: exactly one finish chunk per index.
    finishes = [(c.choices[0].index, c.choices[0].finish_reason) for c in chunks]
    assert sorted(f for f in finishes if f[1] is not None) == [(0, "length"), (1, "length")]


def test_continuous_usage_stats(server: Server) -> None:
    body = {
        "messages": MSG, "max_tokens": 6, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }  # fmt: skip
    with httpx.stream("POST", server.base + CHAT, json=body, timeout=30) as r:
        events = _sse(r)
    assert all(e["usage"] is not None for e in events)
    done = [e["usage"]["completion_tokens"] for e in events]
    assert done == sorted(done) and done[-1] == 6
    last = events[-1]["usage"]
    assert last["total_tokens"] == last["prompt_tokens"] + 6
    # Without it, only the final usage chunk carries usage.
    body["stream_options"] = {"include_usage": True}
    with httpx.stream("POST", server.base + CHAT, json=body, timeout=30) as r:
        events = _sse(r)
    assert [e["choices"] for e in events if "usage" in e] == [[]]


def test_continue_final_message(client: openai.OpenAI, hf: Any) -> None:
    tok, _ = hf
    messages = [*MSG, {"role": "assistant", "content": "jumps over"}]
    r = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, temperature=0,  # type: ignore[arg-type]
        extra_body={"continue_final_message": True, "ignore_eos": True},
    )  # fmt: skip
    text = tok.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert text.endswith("jumps over")
    assert r.usage is not None and r.usage.prompt_tokens == len(ids)
    assert r.choices[0].message.content == tok.decode(_greedy(hf, ids, 8))
    with pytest.raises(openai.BadRequestError, match="cannot both be true"):
        client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=2,  # type: ignore[arg-type]
            extra_body={"continue_final_message": True, "add_generation_prompt": True},
        )  # fmt: skip


# ---------------------------------------------------------------- models


def test_model_by_id(server: Server, tiny_llama: Path) -> None:
    card = httpx.get(server.base + f"/v1/models/{MODEL}", timeout=10).json()
    assert (card["id"], card["object"], card["root"]) == (MODEL, "model", str(tiny_llama))
    # The local path the name resolved to names the same model, here and in requests.
    assert httpx.get(server.base + f"/v1/models{tiny_llama}", timeout=10).status_code == 200
    body = {"model": str(tiny_llama), "prompt": "a", "max_tokens": 1}
    assert httpx.post(server.base + COMPLETIONS, json=body, timeout=10).status_code == 200
    r = httpx.get(server.base + "/v1/models/other", timeout=10)
    assert r.status_code == 404
    assert r.json()["error"]["message"] == "The model `other` does not exist."


# ---------------------------------------------------------------- legacy completions


def test_echo_with_prompt_logprobs(server: Server, hf: Any) -> None:
    tok, _ = hf
    prompt = "The quick brown fox jumps over the lazy dog"
    ids = tok(prompt)["input_ids"]
    body = {"prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True,
            "echo": True, "logprobs": 2}  # fmt: skip
    out = httpx.post(server.base + COMPLETIONS, json=body, timeout=30).json()
    choice = out["choices"][0]
    new = _greedy(hf, ids, 4)
    assert choice["text"] == prompt + tok.decode(new)
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 4 == out["usage"]["total_tokens"]
    assert lp["tokens"][0] == tok.convert_ids_to_tokens(ids[0]) or lp["tokens"][0] == tok.decode(
        ids[:1]
    )
    assert (lp["token_logprobs"][0], lp["top_logprobs"][0]) == (None, None)
    ref = _prompt_logprobs(hf, ids)
    assert lp["token_logprobs"][1 : len(ids)] == pytest.approx(ref, abs=1e-4)
    assert all(len(t) <= 2 for t in lp["top_logprobs"][1:])
    # Without logprobs, echo is the text alone.
    body.pop("logprobs")
    plain = httpx.post(server.base + COMPLETIONS, json=body, timeout=30).json()["choices"][0]
    assert (plain["text"], plain["logprobs"]) == (choice["text"], None)


def test_several_prompts_stream(server: Server, hf: Any) -> None:
    tok, _ = hf
    prompts = ["one two", "three four five"]
    body = {"prompt": prompts, "max_tokens": 5, "temperature": 0, "ignore_eos": True, "n": 2,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    with httpx.stream("POST", server.base + COMPLETIONS, json=body, timeout=30) as r:
        assert r.status_code == 200
        events = _sse(r)
    texts: dict[int, str] = {}
    finished: list[int] = []
    for e in events[:-1]:
        c = e["choices"][0]
        texts[c["index"]] = texts.get(c["index"], "") + c["text"]
        if c["finish_reason"] is not None:
            finished.append(c["index"])
    assert sorted(finished) == [0, 1, 2, 3]
    for i, prompt in enumerate(prompts):
        want = tok.decode(_greedy(hf, tok(prompt)["input_ids"], 5))
        assert texts[2 * i] == texts[2 * i + 1] == want
    usage = events[-1]["usage"]
    lengths = [len(tok(p)["input_ids"]) for p in prompts]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (sum(lengths), 20)


# ---------------------------------------------------------------- SGLang's /generate


def test_generate_defaults_and_batch_shape(server: Server) -> None:
    one = httpx.post(
        server.base + GENERATE,
        json={"text": "a b", "sampling_params": {"ignore_eos": True}},
        timeout=60,
    ).json()
    assert one["meta_info"]["completion_tokens"] == 128  # SGLang's default length
    assert one["meta_info"]["finish_reason"] == {"type": "length", "length": 128}
    assert set(one["meta_info"]) >= {
        "id", "prompt_tokens", "completion_tokens", "cached_tokens", "e2e_latency"
    }  # fmt: skip
    batch = httpx.post(
        server.base + GENERATE,
        json={"text": ["a b"], "sampling_params": {"max_new_tokens": 2}},
        timeout=30,
    ).json()
    assert isinstance(batch, list) and len(batch) == 1 and batch[0]["index"] == 0


def test_generate_logprobs(server: Server, hf: Any) -> None:
    tok, _ = hf
    ids = tok("The quick brown fox jumps over")["input_ids"]
    body = {
        "input_ids": ids, "sampling_params": {"max_new_tokens": 4, "temperature": 0,
        "ignore_eos": True}, "return_logprob": True, "logprob_start_len": 2,
        "top_logprobs_num": 3, "return_text_in_logprobs": True,
    }  # fmt: skip
    meta = httpx.post(server.base + GENERATE, json=body, timeout=30).json()["meta_info"]
    ins, outs = meta["input_token_logprobs"], meta["output_token_logprobs"]
    assert meta["prompt_tokens"] == 2 + len(ins) == len(ids)
    assert [x[1] for x in ins] == ids[2:]
    assert [x[0] for x in ins] == pytest.approx(_prompt_logprobs(hf, ids)[1:], abs=1e-4)
    assert [x[1] for x in outs] == _greedy(hf, ids, 4)
    assert [x[2] for x in outs] == [tok.decode([t]) for t in _greedy(hf, ids, 4)]
    assert [len(t) for t in meta["output_top_logprobs"]] == [3, 3, 3, 4 - 1]
    # Greedy: the chosen token is the most likely one.
    assert [t[0][:2] for t in meta["output_top_logprobs"]] == [x[:2] for x in outs]
    body["logprob_start_len"], body["return_text_in_logprobs"] = 0, False
    meta = httpx.post(server.base + GENERATE, json=body, timeout=30).json()["meta_info"]
    first = meta["input_token_logprobs"][0]
    assert first == [None, ids[0], None] and meta["input_top_logprobs"][0] is None
    assert len(meta["input_token_logprobs"]) == len(ids)


def test_flush_cache(server: Server) -> None:
    body = {"input_ids": list(range(5, 45)), "sampling_params": {"max_new_tokens": 1}}
    httpx.post(server.base + GENERATE, json=body, timeout=30).raise_for_status()
    hit = httpx.post(server.base + GENERATE, json=body, timeout=30).json()["meta_info"]
    assert hit["cached_tokens"] == 39
    assert server.wait_idle()["tree_slots"] > 0
    r = httpx.post(server.base + "/flush_cache", timeout=10)
    assert (r.status_code, r.headers["content-type"].split(";")[0]) == (200, "text/plain")
    assert r.text.startswith("Cache flushed.\n")
    s = server.stats()
    assert (s["tree_slots"], s["free_slots"]) == (0, s["total_slots"])
    cold = httpx.post(server.base + GENERATE, json=body, timeout=30).json()["meta_info"]
    assert cold["cached_tokens"] == 0
    # Refused (400) while a request runs: 900 decode steps, seconds on any CPU.
    stream = {**body, "stream": True, "sampling_params": {"max_new_tokens": 900,
              "ignore_eos": True}}  # fmt: skip
    with httpx.stream("POST", server.base + GENERATE, json=stream, timeout=60) as r:
        lines = r.iter_lines()  # kept: dropping it closes the stream (and aborts the request)
        assert next(lines).startswith("data: ")
        assert httpx.get(server.base + "/flush_cache", timeout=10).status_code == 400
        assert server.stats()["running"] == 1
    server.wait_idle()


def test_server_info_shape(server: Server) -> None:
    info = httpx.get(server.base + "/get_server_info", timeout=10).json()
    assert info["max_total_num_tokens"] == info["scheduler"]["total_slots"] == 3000
    assert info["internal_states"] == [info["scheduler"]]
    assert (info["served_model_name"], info["chunked_prefill_size"]) == (MODEL, 16)
    assert isinstance(info["version"], str) and info["status"] == "ready"
