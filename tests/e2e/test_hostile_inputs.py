"""Hostile requests against a real server (tiny Qwen2-VL, --chat-template qwen2-vl): each bad
request in hostile_cases.BAD gets a 4xx OpenAI error object whose message says what to fix, and
the server serves the next request; property-based fuzzing of /openapi.json finds no 5xx; no KV
slot leaks. A second server (private media URLs allowed, --api-key) takes the slow-loris image
host and the API-key checks.

Redirects to private addresses are refused hop by hop: that is tested at the media level
(test_media.py::test_each_redirect_hop_is_rechecked), since without --allow-private-media-urls
no server reachable from this sandbox can host the first, public hop.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hostile_cases import (
    BAD,
    CHAT,
    COMPLETIONS,
    CONTEXT,
    GENERATE,
    MAX_BODY,
    Bad,
    MediaHost,
    animated_gif,
    chat,
    data_uri,
    with_image,
)
from server_harness import Server, serve_module

pytestmark = pytest.mark.slow

API_KEY = "fovea-test-key-7f3a9c"


# ---------------------------------------------------------------------------- servers


FLAGS = (
    "--chat-template", "qwen2-vl", "--served-model-name", "tiny-vl",
    "--context-length", str(CONTEXT), "--media-fetch-timeout", "1",
)  # fmt: skip


@pytest.fixture(scope="module")
def server(tiny_qwen2_vl: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from serve_module(
        tiny_qwen2_vl, *FLAGS, "--max-images-per-request", "4",
        "--max-request-bytes", str(MAX_BODY), logs=tmp_path_factory,
    )  # fmt: skip


@pytest.fixture(scope="module")
def keyed(tiny_qwen2_vl: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from serve_module(
        tiny_qwen2_vl, *FLAGS, "--allow-private-media-urls", "--api-key", API_KEY,
        "--log-level", "debug", "--enable-metrics", logs=tmp_path_factory,
    )  # fmt: skip


@pytest.fixture(scope="module")
def media() -> Iterator[MediaHost]:
    host = MediaHost()
    yield host
    host.close()


# ---------------------------------------------------------------------------- helpers


def send(base: str, bad: Bad) -> httpx.Response:
    if isinstance(bad.body, bytes):
        content: bytes | None = bad.body
    else:
        content = None if bad.body is None else httpx.Request("POST", "/", json=bad.body).content
    headers = {"content-type": "application/json"}
    return httpx.request(bad.method, base + bad.path, content=content, headers=headers, timeout=60)


def assert_error(r: httpx.Response, status: int, message: str, param: str | None = "-") -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert message in err["message"], err["message"]
    assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    if param != "-":
        assert err["param"] == param


def assert_serving(base: str, headers: dict[str, str] | None = None) -> None:
    """A short greedy request completes normally."""
    body = chat("Hello there", temperature=0, ignore_eos=True)
    r = httpx.post(base + CHAT, json=body, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 2


# ---------------------------------------------------------------------------- tests


@pytest.mark.parametrize("case", list(BAD.values()), ids=list(BAD))
def test_bad_request_gets_a_4xx_and_the_server_goes_on(server: Server, case: Bad) -> None:
    assert_error(send(server.base, case), case.status, case.message, case.param)
    assert_serving(server.base)


def test_the_table_is_large_and_distinct() -> None:
    assert len(BAD) >= 40
    assert len({(b.path, repr(b.body), b.method) for b in BAD.values()}) == len(BAD)


def _raw_http(port: int, head: bytes) -> bytes:
    """Send a request head over a plain socket; the reply's status line and headers."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head)
        reply = b""
        while b"\r\n\r\n" not in reply:
            data = s.recv(65536)
            if not data:
                break
            reply += data
        return reply


def test_content_length_over_the_limit_is_refused_before_the_body(server: Server) -> None:
    # 1 GB announced, not a byte sent: the answer must come without waiting for the body.
    head = (
        f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Content-Length: 1000000000\r\n\r\n"
    ).encode()
    t0 = time.monotonic()
    reply = _raw_http(server.port, head)
    assert reply.startswith(b"HTTP/1.1 413 "), reply[:200]
    assert b"content-type: application/json" in reply.lower()
    assert time.monotonic() - t0 < 5
    assert_serving(server.base)


def test_chunked_upload_over_the_limit_is_refused(server: Server) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(MAX_BODY // 10_000 + 2):
            yield b"x" * 10_000
        yield b'"}]}'

    r = httpx.post(
        server.base + CHAT, content=chunks(), headers={"content-type": "application/json"}
    )
    assert "content-length" not in {k.lower() for k in r.request.headers}
    assert_error(r, 413, f"larger than the {MAX_BODY}-byte limit")
    # A chunked body under the limit is read whole and served.
    body = httpx.Request("POST", "/", json=chat("hi", temperature=0)).content
    r = httpx.post(
        server.base + CHAT, content=iter([body[:7], body[7:]]),
        headers={"content-type": "application/json"}, timeout=60,
    )  # fmt: skip
    assert r.status_code == 200, r.text


def test_animated_gif_with_many_frames_is_read_as_its_first_frame(server: Server) -> None:
    gif = animated_gif(2000)
    t0 = time.monotonic()
    r = httpx.post(server.base + CHAT, json=with_image(data_uri(gif, "image/gif")), timeout=60)
    assert r.status_code == 200, r.text
    assert time.monotonic() - t0 < 10


def test_valid_logit_bias_is_applied(server: Server) -> None:
    params = {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True}
    plain = httpx.post(
        server.base + GENERATE, json={"text": "Hello", "sampling_params": params}, timeout=60
    ).json()
    # A token greedy decoding does not pick, forced by +100; and the greedy pick banned.
    forced = next(t for t in range(100, 200) if t not in plain["output_ids"])
    bias = {"logit_bias": {str(forced): 100, str(plain["output_ids"][0]): -100}}
    out = httpx.post(
        server.base + GENERATE,
        json={"text": "Hello", "sampling_params": {**params, **bias}},
        timeout=60,
    ).json()
    assert out["output_ids"] == [forced] * 4
    r = httpx.post(
        server.base + COMPLETIONS,
        json={"prompt": "Hello", "max_tokens": 4, "temperature": 0, "ignore_eos": True, **bias},
        timeout=60,
    )
    assert r.json()["choices"][0]["text"] == out["text"]


def test_slow_loris_image_server_times_out(keyed: Server, media: MediaHost) -> None:
    auth = {"Authorization": f"Bearer {API_KEY}"}
    t0 = time.monotonic()
    r = httpx.post(keyed.base + CHAT, json=with_image(media.url("/drip.png")), headers=auth)
    elapsed = time.monotonic() - t0
    # --media-fetch-timeout 1: each read gets its byte in time, the whole fetch gets 3 s.
    assert_error(r, 400, f"fetching image {media.url('/drip.png')} timed out", "messages")
    assert 2.5 < elapsed < 8
    # The same host is allowed here (--allow-private-media-urls) and serves a real image.
    r = httpx.post(keyed.base + CHAT, json=with_image(media.url("/cat.png")), headers=auth)
    assert r.status_code == 200, r.text
    assert_serving(keyed.base, auth)


ROUTES = [
    ("POST", CHAT, chat("hi")),
    ("POST", COMPLETIONS, {"prompt": "hi", "max_tokens": 2}),
    ("POST", GENERATE, {"text": "hi", "sampling_params": {"max_new_tokens": 2}}),
    ("GET", "/v1/models", None),
    ("GET", "/get_model_info", None),
    ("GET", "/get_server_info", None),
    ("GET", "/model_info", None),
    ("GET", "/server_info", None),
    ("GET", "/get_load", None),
    ("GET", "/health_generate", None),
    ("GET", "/metrics", None),
    ("GET", "/openapi.json", None),
    ("GET", "/docs", None),
]


def test_api_key_guards_every_route_but_health(keyed: Server) -> None:
    wrong = [{}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {API_KEY}"},
             {"Authorization": f"Bearer {API_KEY}x"}, {"Authorization": API_KEY}]  # fmt: skip
    for method, path, body in [*ROUTES, ("GET", "/no/such/route", None)]:
        for headers in wrong:
            r = httpx.request(method, keyed.base + path, json=body, headers=headers, timeout=60)
            assert_error(r, 401, "missing or invalid API key")
            assert r.json()["error"]["code"] == "invalid_api_key"
            assert API_KEY not in r.text
        r = httpx.request(
            method, keyed.base + path, json=body, timeout=60,
            headers={"Authorization": f"bearer {API_KEY}"},
        )  # fmt: skip
        assert r.status_code == (404 if path == "/no/such/route" else 200), (path, r.text)
    assert httpx.get(keyed.base + "/health", timeout=10).status_code == 200
    info = httpx.get(
        keyed.base + "/get_server_info", headers={"Authorization": f"Bearer {API_KEY}"}
    ).json()
    assert info["args"]["api_key"] == "***"


def test_api_key_never_reaches_the_log(keyed: Server) -> None:
    """Runs after the requests above (wrong keys, the right key, start-up at debug level)."""
    assert keyed.log_path is not None
    log = keyed.log_path.read_text(errors="replace")
    assert "role=http" in log and "HTTP Request" in log  # the log is the debug-level one
    assert API_KEY not in log


def test_client_leaving_mid_request_aborts_it_cleanly(server: Server) -> None:
    """A client that gives up (its timeout) gets its requests aborted, batches included,
    and the server logs no error for it."""
    log = server.log_path
    assert log is not None

    def abandoned() -> int:
        return log.read_text().count("abandoned by the client: aborting")

    before = abandoned()
    # Each takes well over the client's 50 ms: 8 sequences of 150 tokens, at least.
    native = {"temperature": 0, "ignore_eos": True, "n": 8}
    long = {**native, "max_tokens": 150}
    for path, body in [
        (CHAT, chat("Tell me a story", **long)),
        (COMPLETIONS, {"prompt": ["Once", "upon", "a time"], **long}),
        (
            GENERATE,
            {"text": ["Once", "upon"], "sampling_params": {**native, "max_new_tokens": 150}},
        ),
    ]:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.base + path, json=body, timeout=0.05)
    deadline = time.monotonic() + 10
    while abandoned() < before + 6 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert abandoned() == before + 6
    assert_serving(server.base)


POST_ROUTES = [CHAT, COMPLETIONS, GENERATE]


def _cap_work(body: Any) -> Any:
    """The fuzzer hunts 5xx, not throughput: the schema allows 128 sequences per prompt, many
    prompts, each to the end of the context (minutes of CPU per request), so the generation
    work of each case is capped. Everything else is sent as generated."""
    if not isinstance(body, dict):
        return body
    body = dict(body)
    params = body.get("sampling_params")
    if isinstance(params, dict):
        params = body["sampling_params"] = dict(params)
    targets = [body, *([params] if isinstance(params, dict) else [])]
    for t in targets:
        if isinstance(t.get("n"), int) and t["n"] > 2:
            t["n"] = 2
        for key in ("max_tokens", "max_completion_tokens", "max_new_tokens"):
            if key in t and (t[key] is None or (isinstance(t[key], int) and t[key] > 4)):
                t[key] = 4
    if not {"max_tokens", "max_completion_tokens"} & set(body):
        body["max_tokens"] = 4  # chat's default is the whole context
    if isinstance(params, dict) and "max_new_tokens" not in params:
        params["max_new_tokens"] = 4
    for key in ("prompt", "text", "input_ids"):
        value = body.get(key)
        if isinstance(value, list) and value and not isinstance(value[0], int):
            body[key] = value[:3]
    return body


@pytest.mark.parametrize("path", POST_ROUTES)
def test_openapi_fuzzing_finds_no_server_error(server: Server, path: str) -> None:
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    schema = schemathesis.openapi.from_url(server.base + "/openapi.json")
    op = schema[path]["POST"]
    cases = st.one_of(
        op.as_strategy(schemathesis.GenerationMode.POSITIVE),
        op.as_strategy(schemathesis.GenerationMode.NEGATIVE),
    )
    seen: dict[int, int] = {}

    @settings(
        max_examples=25,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=cases)
    def fuzz(case: Any) -> None:
        case.body = _cap_work(case.body)
        r = case.call(base_url=server.base, timeout=60)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500, (case.body, r.content[:500])

    fuzz()
    # Cases were really sent (whether generated ones are served or refused varies with the
    # hypothesis version; the property is: never a 5xx).
    assert sum(seen.values()) >= 10 and all(code < 500 for code in seen), seen
    assert_serving(server.base)


def test_no_kv_slot_leaks_and_no_error_logged_after_all_of_it(server: Server) -> None:
    """Runs last on this server: everything above finished or was refused, every KV slot is
    free or held by the prefix cache, and nothing made the server log an error."""
    s = server.wait_idle()
    assert s["free_slots"] + s["tree_slots"] == s["total_slots"]
    assert_serving(server.base)
    assert server.log_path is not None
    log = server.log_path.read_text()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
