"""Two Fovea servers on a tiny random Qwen2-VL behind SGLang's router (PyPI `sglang-router`, its
cache-aware policy), all on loopback: the router registers both from Fovea's routes, and chat
(JSON and SSE, images as data: URIs), completions and /generate through it answer exactly what
a direct request to one server answers. The router writes its own defaults into every request
it forwards; Fovea takes them and still refuses a real ask it does not implement."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from router_harness import Router
from server_harness import Server
from vision_helpers import SYSTEM, image_part, png, text_part

pytestmark = pytest.mark.slow

MODEL = "tiny-vl"
N_NEW = 12
TIMEOUT = 300.0  # one request on a busy 2-core machine; the tests never wait on a hang


@pytest.fixture(scope="module")
def servers(
    tiny_qwen2_vl: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Server]]:
    logs = tmp_path_factory.mktemp("logs")
    flags = ("--chat-template", "qwen2-vl", "--served-model-name", MODEL,
             "--max-total-tokens", "4000", "--enable-metrics")  # fmt: skip
    started: list[Server] = []
    try:
        # Both start at once (each loads in its own processes), then each is waited for.
        for i in range(2):
            started.append(Server(tiny_qwen2_vl, *flags, log_path=logs / f"server{i}.log"))
        for srv in started:
            srv.wait_ready(timeout=600)  # two servers loading at once on a busy machine
        yield started
    finally:
        codes = [srv.stop() for srv in started]
    assert codes == [0, 0], [srv.log_tail() for srv in started]


@pytest.fixture(scope="module")
def router(servers: list[Server], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Router]:
    r = Router([s.base for s in servers], tmp_path_factory.mktemp("router") / "router.log")
    try:
        yield r.wait_ready()
    finally:
        r.stop()


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=TIMEOUT)


def data_uri(name: str) -> str:
    return "data:image/png;base64," + base64.b64encode(png(name)).decode()


CHATS: dict[str, list[dict[str, Any]]] = {
    "text": [SYSTEM, {"role": "user", "content": "The quick brown fox"}],
    "image": [
        SYSTEM,
        {"role": "user", "content": [image_part(data_uri("cat")), text_part("What is it?")]},
    ],
    "two_images": [
        SYSTEM,
        {
            "role": "user",
            "content": [
                text_part("Compare"),
                image_part(data_uri("dog")),
                text_part("with"),
                image_part(data_uri("owl")),
            ],
        },
    ],
}
GREEDY = {"max_tokens": N_NEW, "temperature": 0, "extra_body": {"ignore_eos": True}}


def chat_answer(base: str, messages: list[dict[str, Any]]) -> tuple[str, str, int, int]:
    r = client(base).chat.completions.create(model=MODEL, messages=messages, **GREEDY)  # type: ignore[arg-type]
    choice = r.choices[0]
    assert r.usage is not None
    return (choice.message.content or "", choice.finish_reason, r.usage.prompt_tokens,
            r.usage.completion_tokens)  # fmt: skip


def generate(base: str, body: dict[str, Any]) -> Any:
    r = httpx.post(base + "/generate", json=body, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    return r.json()


def scheduler(servers: list[Server]) -> list[dict[str, int]]:
    return [srv.wait_idle(TIMEOUT) for srv in servers]


def test_router_registers_both_workers_from_fovea_routes(
    router: Router, servers: list[Server], tiny_qwen2_vl: Path
) -> None:
    workers = sorted(router.workers_info(), key=lambda w: str(w["url"]))
    assert [w["url"] for w in workers] == sorted(s.base for s in servers)
    for w in workers:
        assert w["model_id"] == MODEL
        assert w["connection_mode"] == "HTTP"
        assert w["metadata"]["served_model_name"] == MODEL
        assert w["metadata"]["model_path"] == str(tiny_qwen2_vl)
    # /server_info and /model_info answered under their current names (no fallback to the
    # deprecated /get_ ones) and /get_load in SGLang's shape: an idle server's load is 0
    # (-1 is the router's "could not read it").
    log = router.log_text()
    assert "falling back" not in log and "Failed to fetch metadata" not in log, log[-3000:]
    loads = httpx.get(router.base + "/get_loads", timeout=TIMEOUT).json()["workers"]
    assert sorted((w["worker"], w["load"]) for w in loads) == sorted((s.base, 0) for s in servers)
    assert [m.id for m in client(router.base).models.list().data] == [MODEL]


@pytest.mark.parametrize("case", list(CHATS))
def test_chat_through_router_equals_direct(
    router: Router, servers: list[Server], case: str
) -> None:
    via_router = chat_answer(router.base, CHATS[case])
    assert via_router == chat_answer(servers[0].base, CHATS[case])
    assert via_router[1:] == ("length", via_router[2], N_NEW)


def test_chat_stream_through_router_equals_direct(router: Router, servers: list[Server]) -> None:
    messages = CHATS["image"]
    stream = client(router.base).chat.completions.create(
        model=MODEL,
        messages=messages,
        stream=True,
        stream_options={"include_usage": True},  # type: ignore[arg-type]
        **GREEDY,  # type: ignore[arg-type]
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    content, _, prompt_tokens, _ = chat_answer(servers[0].base, messages)
    assert (text, finish) == (content, ["length"])
    usage = chunks[-1].usage
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (
        prompt_tokens,
        N_NEW,
    )


def test_chat_without_a_model_name_through_router(router: Router, servers: list[Server]) -> None:
    # The router names a request without `model` "unknown"; Fovea takes that as no name.
    body = {"messages": CHATS["text"], "max_tokens": N_NEW, "temperature": 0, "ignore_eos": True}
    r = httpx.post(router.base + "/v1/chat/completions", json=body, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert (
        r.json()["choices"][0]["message"]["content"]
        == chat_answer(servers[0].base, CHATS["text"])[0]
    )


def test_completions_through_router_equals_direct(router: Router, servers: list[Server]) -> None:
    def answer(base: str) -> tuple[str, int]:
        r = client(base).completions.create(model=MODEL, prompt="Once upon a time", **GREEDY)  # type: ignore[arg-type]
        assert r.usage is not None
        return r.choices[0].text, r.usage.completion_tokens

    assert answer(router.base) == answer(servers[0].base)


def generate_bodies() -> dict[str, dict[str, Any]]:
    sampling = {"max_new_tokens": N_NEW, "temperature": 0, "ignore_eos": True}
    placeholder = "<|vision_start|><|image_pad|><|vision_end|>"
    return {
        "text": {"text": "The quick brown fox", "sampling_params": sampling},
        "input_ids": {"input_ids": [305, 378, 326, 284, 42], "sampling_params": sampling},
        "image": {
            "text": f"{placeholder}Describe it.",
            "image_data": data_uri("dog"),
            "sampling_params": sampling,
        },
        "logprobs": {
            "input_ids": [31, 41, 59, 26, 53],
            "sampling_params": sampling,
            "return_logprob": True,
        },
    }


@pytest.mark.parametrize("case", list(generate_bodies()))
def test_generate_through_router_equals_direct(
    router: Router, servers: list[Server], case: str
) -> None:
    body = generate_bodies()[case]
    out, ref = generate(router.base, body), generate(servers[0].base, body)
    assert len(out["output_ids"]) == N_NEW
    assert (out["text"], out["output_ids"]) == (ref["text"], ref["output_ids"])
    assert out["meta_info"]["prompt_tokens"] == ref["meta_info"]["prompt_tokens"]
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": N_NEW}
    if body.get("return_logprob"):
        ids = [entry[1] for entry in out["meta_info"]["output_token_logprobs"]]
        assert ids == ref["output_ids"]


def test_generate_stream_through_router_equals_direct(
    router: Router, servers: list[Server]
) -> None:
    body = {**generate_bodies()["image"], "stream": True}
    events = []
    with httpx.stream("POST", router.base + "/generate", json=body, timeout=TIMEOUT) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: ") :])
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    ref = generate(servers[0].base, generate_bodies()["image"])
    assert (last["text"], last["output_ids"]) == (ref["text"], ref["output_ids"])


def test_a_client_leaving_mid_stream_aborts_the_request_on_its_worker(
    router: Router, servers: list[Server]
) -> None:
    # The router closes its upstream connection when the client goes; the worker aborts the
    # request (long before its 900 tokens; the context is 1024) and frees its slots.
    before = scheduler(servers)
    sampling = {"max_new_tokens": 900, "temperature": 0, "ignore_eos": True}
    body = {
        "text": "A long story: " + uuid.uuid4().hex,
        "sampling_params": sampling,
        "stream": True,
    }
    with httpx.stream("POST", router.base + "/generate", json=body, timeout=TIMEOUT) as r:
        assert r.status_code == 200, r.read()
        events = 0
        for line in r.iter_lines():
            events += line.startswith("data: ")
            if events == 3:
                break
    after = scheduler(servers)
    generated = sum(
        a["generated_tokens"] - b["generated_tokens"] for a, b in zip(after, before, strict=True)
    )
    assert 3 <= generated < 900
    for stats in after:
        assert stats["free_slots"] + stats["tree_slots"] == stats["total_slots"], stats


def test_router_sends_a_repeated_prefix_to_the_worker_that_cached_it(
    router: Router, servers: list[Server]
) -> None:
    # Both caches emptied, then a prompt no earlier request had: the first lands on one
    # worker, the second (the same text and image) on the same one by its prefix, and hits
    # that worker's cache.
    messages = [
        SYSTEM,
        {"role": "user", "content": [image_part(data_uri("fox")),
                                     text_part(f"Tell me about {uuid.uuid4().hex}")]},
    ]  # fmt: skip
    before = scheduler(servers)
    for srv in servers:
        assert httpx.post(srv.base + "/flush_cache", timeout=TIMEOUT).status_code == 200
    answers = []
    for _ in range(2):
        r = client(router.base).chat.completions.create(model=MODEL, messages=messages, **GREEDY)  # type: ignore[arg-type]
        assert r.usage is not None and r.usage.prompt_tokens_details is not None
        answers.append((r.usage.prompt_tokens, r.usage.prompt_tokens_details.cached_tokens))
    prompt_tokens = answers[0][0]
    # The last prompt token is always recomputed (its logits start the answer).
    assert answers == [(prompt_tokens, 0), (prompt_tokens, prompt_tokens - 1)]
    after = scheduler(servers)
    grew = sorted(
        (a["prompt_tokens"] - b["prompt_tokens"], a["images_encoded"] - b["images_encoded"])
        for a, b in zip(after, before, strict=True)
    )
    assert grew == [(0, 0), (2 * prompt_tokens, 1)]


def test_refusals_pass_through_the_router(router: Router) -> None:
    def refusal(body: dict[str, Any]) -> tuple[int, str]:
        r = httpx.post(router.base + "/v1/chat/completions", json=body, timeout=TIMEOUT)
        return r.status_code, r.json()["error"]["message"]

    base = {"model": MODEL, "messages": CHATS["text"], "max_tokens": 2}
    # The router's own default (false) passes; asking for it is refused by name.
    status, message = refusal({**base, "no_stop_trim": True})
    assert (status, message.split(" (")[0]) == (400, "unsupported parameter: no_stop_trim")
    assert refusal({**base, "model": "other"}) == (404, "The model `other` does not exist.")


def test_flush_cache_through_router_empties_every_worker(
    router: Router, servers: list[Server]
) -> None:
    scheduler(servers)
    r = httpx.post(router.base + "/flush_cache", timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert (r.json()["workers_flushed"], r.json()["total_http_workers"]) == (2, 2)
    for stats in scheduler(servers):
        assert (stats["tree_slots"], stats["free_slots"]) == (0, stats["total_slots"])
