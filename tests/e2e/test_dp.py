"""--dp-size 2 on CPU: requests sharing a prefix (text, or the same image) land on the replica
that caches it and hit its cache by the exact token count, different prefixes spread; streaming,
stop strings, disconnects and SIGTERM drain work across replicas; every replica ends with its
slots exact; /health, /get_server_info and /metrics name each replica; a dead replica takes the
whole server down."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from server_harness import Server, role_children, serve_module, wait_gone
from vision_helpers import ImageHost, Reference, image_part, text_part

from fovea.worker.cpu_threads import numa_nodes, replica_cpus

pytestmark = pytest.mark.slow

MODEL = "tiny-vl"
SEA = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Tell me about the sea and the sky."},
]
CAT = [
    {"role": "system", "content": "Answer in French, always, whatever the question says."},
    {"role": "user", "content": "What is a cat, and why do cats purr so much at night?"},
]
# A long text before the image, so that a request with another image after it still shares
# most of its tokens with this one (and is routed to where this one is cached).
LOOK = "Look at the picture closely and describe every detail of it, one by one, in order. " * 3


def look(host: ImageHost, name: str) -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": LOOK},
        {"role": "user", "content": [image_part(host.url(name)), text_part("Go.")]},
    ]


@pytest.fixture(scope="module")
def server(tiny_qwen2_vl: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from serve_module(
        tiny_qwen2_vl, "--dp-size", "2", "--chat-template", "qwen2-vl",
        "--allow-private-media-urls", "--enable-metrics", "--served-model-name", MODEL,
        "--max-total-tokens", "4000", "--log-format", "json", logs=tmp_path_factory,
    )  # fmt: skip


def replicas(srv: Server) -> list[dict[str, Any]]:
    r = httpx.get(srv.base + "/get_server_info", timeout=10)
    r.raise_for_status()
    states: list[dict[str, Any]] = r.json()["internal_states"]
    return states


def chat(client: openai.OpenAI, srv: Server, messages: list[dict[str, Any]]) -> tuple[int, Any]:
    """(the replica that served it, the response), from the replicas' prompt token counts."""
    before = [s["prompt_tokens"] for s in replicas(srv)]
    resp = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=4, temperature=0,  # type: ignore[arg-type]
    )  # fmt: skip
    after = [s["prompt_tokens"] for s in replicas(srv)]
    grew = [d for d in range(2) if after[d] != before[d]]
    assert len(grew) == 1, (before, after)
    assert after[grew[0]] - before[grew[0]] == resp.usage.prompt_tokens  # type: ignore[union-attr]
    return grew[0], resp


def cached(resp: Any) -> int:
    """usage.prompt_tokens_details.cached_tokens of a response (or of a usage chunk)."""
    usage = getattr(resp, "usage", None) or resp
    return int(usage.prompt_tokens_details.cached_tokens)


def assert_replicas_idle_exact(srv: Server) -> None:
    deadline = time.monotonic() + 30
    states = replicas(srv)
    while any(s["running"] or s["waiting"] for s in states):
        assert time.monotonic() < deadline, states
        time.sleep(0.1)
        states = replicas(srv)
    for s in states:
        assert s["free_slots"] + s["tree_slots"] == s["total_slots"], s


def role_pids(srv: Server) -> dict[str, int]:
    """role -> pid, from the processes' JSON start lines."""
    assert srv.log_path is not None
    out = {}
    for line in srv.log_path.read_text().splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            if str(rec.get("message", "")).startswith("role="):
                out[rec["role"]] = int(rec["pid"])
    return out


def test_text_prefixes_stick_to_their_replica_and_hit_its_cache(
    server: Server, client: openai.OpenAI
) -> None:
    # After the warm-up both replicas are idle with equal trees: the first prefix takes rank
    # 0, a different one the replica with the smaller tree.
    d, first = chat(client, server, SEA)
    assert (d, cached(first)) == (0, 0)
    d, other = chat(client, server, CAT)
    assert (d, cached(other)) == (1, 0)
    # The same prompts again: the same replicas, every prompt token but the last cached.
    d, again = chat(client, server, SEA)
    assert (d, cached(again)) == (0, first.usage.prompt_tokens - 1)
    d, again = chat(client, server, CAT)
    assert (d, cached(again)) == (1, other.usage.prompt_tokens - 1)
    assert again.choices[0].message.content == other.choices[0].message.content
    assert_replicas_idle_exact(server)


def test_images_route_with_their_hash(
    server: Server, client: openai.OpenAI, host: ImageHost, tiny_qwen2_vl: Path
) -> None:
    ref = Reference(tiny_qwen2_vl)
    d_cat, first = chat(client, server, look(host, "cat"))
    d, again = chat(client, server, look(host, "cat"))
    assert (d, cached(again)) == (d_cat, first.usage.prompt_tokens - 1)
    # Another image after the same text: routed to the same replica for its text, which it
    # hits up to the image's first placeholder token, not beyond.
    dog_ids, _ = ref.prompt(look(host, "dog"))
    d, dog = chat(client, server, look(host, "dog"))
    assert dog.usage.prompt_tokens == len(dog_ids)
    assert (d, cached(dog)) == (d_cat, dog_ids.index(ref.pad))
    assert_replicas_idle_exact(server)


def test_generate_runs_on_the_replica_it_names(server: Server) -> None:
    ids = list(range(20, 60))
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 2}}
    hits = []
    for d in (1, 1, 0):
        before = [s["prompt_tokens"] for s in replicas(server)]
        r = httpx.post(server.base + "/generate", json={**body, "data_parallel_rank": d})
        assert r.status_code == 200, r.text
        after = [s["prompt_tokens"] for s in replicas(server)]
        assert [a - b for a, b in zip(after, before, strict=True)] == [40 * (d == 0), 40 * d]
        hits.append(r.json()["meta_info"]["cached_tokens"])
    # The second run on replica 1 hit its own cache; replica 0 had never seen the prompt.
    assert hits == [0, 39, 0]
    r = httpx.post(server.base + "/generate", json={**body, "data_parallel_rank": 2})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == (
        "data_parallel_rank 2 is out of range: the server runs 2 replica(s) (--dp-size)"
    )


def test_disconnects_free_the_slots_of_either_replica(server: Server) -> None:
    for messages in (SEA, CAT):
        body = {
            "model": MODEL, "messages": messages, "max_tokens": 900, "temperature": 0,
            "ignore_eos": True, "stream": True,
        }  # fmt: skip
        url = server.base + "/v1/chat/completions"
        with httpx.stream("POST", url, json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert any(next(lines).startswith("data: ") for _ in range(6))
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url, json={**body, "stream": False}, timeout=httpx.Timeout(10, read=0.05))
    assert_replicas_idle_exact(server)


def test_health_info_and_metrics_per_replica(server: Server) -> None:
    health = httpx.get(server.base + "/health", timeout=10)
    assert health.status_code == 200
    assert health.json() == {
        "status": "ready",
        "replicas": [{"dp_rank": 0, "status": "ready"}, {"dp_rank": 1, "status": "ready"}],
    }
    info = httpx.get(server.base + "/get_server_info", timeout=10).json()
    states = info["internal_states"]
    assert [s["dp_rank"] for s in states] == [0, 1]
    for name in ("total_slots", "free_slots", "tree_slots", "prompt_tokens", "cache_hit_tokens"):
        assert info["scheduler"][name] == states[0][name] + states[1][name]
    assert info["max_total_num_tokens"] == 2 * 4000 == info["scheduler"]["total_slots"]
    assert info["dp_size"] == 2
    time.sleep(1.5)  # the schedulers publish their figures once a second
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.base + "/metrics", timeout=10).text
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    by_rank = {
        s.labels["dp_rank"]: s.value for s in samples if s.name == "fovea:prompt_tokens_total"
    }
    assert by_rank == {"0": states[0]["prompt_tokens"], "1": states[1]["prompt_tokens"]}
    routed = sum(s.value for s in samples if s.name == "fovea:dp_routed_requests_total")
    pinned = sum(
        s.value
        for s in samples
        if s.name == "fovea:dp_routed_requests_total" and s.labels["reason"] == "pinned"
    )
    assert pinned == 2 + 3  # the warm-up (one on each replica) and the /generate test's
    decisions = next(s.value for s in samples if s.name == "fovea:dp_route_seconds_count")
    assert decisions == routed - pinned > 0
    up = {s.labels["role"]: s.value for s in samples if s.name == "fovea:process_up"}
    for role in ("scheduler-dp0", "scheduler-dp1", "worker0-dp0", "worker0-dp1", "tokenizer"):
        assert up[role] == 1


def test_each_replica_runs_on_its_own_cpus(server: Server) -> None:
    pids = role_pids(server)
    usable = sorted(os.sched_getaffinity(0))
    for d in range(2):
        got = os.sched_getaffinity(pids[f"worker0-dp{d}"])
        assert got == replica_cpus(usable, numa_nodes(), d, 2)
    if len(usable) >= 2:
        assert not os.sched_getaffinity(pids["worker0-dp0"]) & os.sched_getaffinity(
            pids["worker0-dp1"]
        )


def stream_tokens(base: str, prompt: str, first: cf.Future[float]) -> tuple[int, str | None]:
    body = {
        "model": "tiny", "prompt": prompt, "max_tokens": 600, "temperature": 0,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    finish, usage = None, None
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=180) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if not first.done():
                first.set_result(time.monotonic())
            for c in chunk.get("choices", []):
                finish = c.get("finish_reason") or finish
            usage = chunk.get("usage") or usage
    return (usage or {}).get("completion_tokens", 0), finish


def stream_and_stop_on_both_replicas(srv: Server) -> None:
    """Each of two prompts (routed to a replica each): streaming equals non-streaming, and a
    stop string cuts the text (the tokenizer's abort reaches the replica running it)."""
    client = srv.openai_client()
    kw: dict[str, Any] = dict(
        model="tiny", max_tokens=24, temperature=0, extra_body={"ignore_eos": True}
    )
    served = []
    for prompt in ("The quick brown fox", "Numbers and letters: 1 2 3 a b c"):
        before = [s["prompt_tokens"] for s in replicas(srv)]
        text = client.completions.create(prompt=prompt, **kw).choices[0].text
        after = [s["prompt_tokens"] for s in replicas(srv)]
        served.append([a != b for a, b in zip(after, before, strict=True)])
        parts, usage = [], None
        for c in client.completions.create(
            prompt=prompt, stream=True, stream_options={"include_usage": True}, **kw
        ):
            parts.extend(ch.text for ch in c.choices)
            usage = c.usage or usage
        assert "".join(parts) == text and len(text) > 8
        assert usage is not None and cached(usage) == usage.prompt_tokens - 1
        stop = text[4:7]
        cut = client.completions.create(prompt=prompt, stop=[stop], **kw).choices[0]
        assert (cut.text, cut.finish_reason) == (text[: text.index(stop)], "stop")
    assert served == [[True, False], [False, True]]
    assert_replicas_idle_exact(srv)


def test_sigterm_drains_both_replicas_then_a_dead_replica_stops_the_server(
    tiny_llama: Path, tmp_path: Path
) -> None:
    srv = Server(
        tiny_llama, "--dp-size", "2", "--served-model-name", "tiny", "--shutdown-timeout", "90",
        "--max-running-requests", "1", "--log-format", "json", log_path=tmp_path / "a.log",
    ).wait_ready()  # fmt: skip
    children = role_children(srv.proc.pid)
    assert len(children) == 6  # 2 x (worker, scheduler), tokenizer, http
    stream_and_stop_on_both_replicas(srv)
    prompts = ["The quick brown fox", "Some other words entirely", "A third one", "And more"]
    with cf.ThreadPoolExecutor(len(prompts)) as pool:
        firsts = [cf.Future() for _ in prompts]  # type: ignore[var-annotated]
        futs = [
            pool.submit(stream_tokens, srv.base, p, f) for p, f in zip(prompts, firsts, strict=True)
        ]
        # The requests spread: both replicas run one (one at a time each), two wait.
        deadline = time.monotonic() + 60
        while [s["running"] for s in replicas(srv)] != [1, 1]:
            assert time.monotonic() < deadline, replicas(srv)
            time.sleep(0.05)
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        r = httpx.post(srv.base + "/v1/completions", json={"model": "tiny", "prompt": "x"})
        assert r.status_code == 503
        results = [f.result(timeout=180) for f in futs]
    assert results == [(600, "length")] * len(prompts)
    assert srv.proc.wait(60) == 0
    assert wait_gone(children) == []

    srv = Server(
        tiny_llama, "--dp-size", "2", "--log-format", "json", log_path=tmp_path / "b.log"
    ).wait_ready()
    children = role_children(srv.proc.pid)
    victim = role_pids(srv)["worker0-dp1"]
    os.kill(victim, signal.SIGKILL)
    assert srv.proc.wait(30) == 1
    assert f"child died: worker0-dp1 (pid {victim}) exited with code -9" in srv.log_tail()
    assert wait_gone(children) == []
