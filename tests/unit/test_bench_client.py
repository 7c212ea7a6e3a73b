"""bench/serving.py's client against a scripted SSE server: what it counts from a stream."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import aiohttp
import pytest

from fovea.bench.serving import Result, send_one

# path -> (status, SSE events); an event is a JSON body, or a raw data string like "[DONE]"
STREAMS: dict[str, tuple[int, list[Any]]] = {
    "/ok": (
        200,
        [
            {"choices": [{"text": "Hel"}]},
            {"choices": [{"text": ""}]},  # no text: not a token gap
            {"choices": [{"text": "lo\u2028x"}]},  # U+2028 inside a string: one line
            {"choices": [{"delta": {"content": "!"}}]},
            {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 4}},
            "[DONE]",
        ],
    ),
    "/error-event": (200, [{"choices": [{"text": "a"}]}, {"error": {"message": "boom"}}]),
    "/refused": (400, [{"error": {"message": "prompt too long"}}]),
    "/empty": (200, ["[DONE]"]),
}


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        status, events = STREAMS[self.path]
        self.send_response(status)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for event in events:
            data = event if isinstance(event, str) else json.dumps(event, ensure_ascii=False)
            self.wfile.write(b"data: " + data.encode() + b"\n\n")
            self.wfile.flush()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def fetch(url: str) -> Result:
    async def go() -> Result:
        async with aiohttp.ClientSession() as session:
            return await send_one(session, url, {"prompt": "x"})

    return asyncio.run(go())


def test_counts_text_chunks_and_takes_usage(base: str) -> None:
    r = fetch(base + "/ok")
    assert (r.ok, r.error) == (True, "")
    assert (r.input_tokens, r.output_tokens) == (7, 4)
    assert len(r.itl_s) == 2  # three chunks with text
    assert r.ttft_s > 0 and r.e2e_s >= r.ttft_s


def test_an_error_event_or_status_fails_the_request(base: str) -> None:
    r = fetch(base + "/error-event")
    assert (r.ok, r.error) == (False, 'stream error: {"message": "boom"}')
    r = fetch(base + "/refused")
    assert r.ok is False
    assert r.error.startswith('HTTP 400: data: {"error": {"message": "prompt too long"}}')


def test_a_stream_without_text_is_a_failure(base: str) -> None:
    r = fetch(base + "/empty")
    assert (r.ok, r.error) == (False, "stream ended without any text")


def test_step_overhead_reads_decode_forwards_from_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    import httpx

    from fovea.bench import step_overhead

    text = (
        "# HELP fovea:step_forward_seconds x\n"
        "# TYPE fovea:step_forward_seconds histogram\n"
        'fovea:step_forward_seconds_bucket{kind="decode",le="+Inf"} 6.0\n'
        'fovea:step_forward_seconds_count{kind="decode"} 6.0\n'
        'fovea:step_forward_seconds_sum{kind="decode"} 0.12\n'
        'fovea:step_forward_seconds_count{kind="prefill"} 3.0\n'
        'fovea:step_forward_seconds_sum{kind="prefill"} 0.9\n'
    )
    calls: list[str] = []

    def get(url: str, timeout: float) -> httpx.Response:
        calls.append(url)
        return httpx.Response(200, text=text)

    monkeypatch.setattr(httpx, "get", get)
    assert step_overhead.decode_forward_s("http://h:1") == (0.12, 6.0)
    assert calls == ["http://h:1/metrics"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--cpu-threads", "-1"], "--cpu-threads must be >= 0, got -1"),
        (["--steps", "7"], "--steps must be >= 8, got 7"),
        (["--batch", "0"], "--batch must be >= 1, got 0"),
        (["--prompt-len", "0"], "--prompt-len must be >= 1, got 0"),
        (["--rounds", "0"], "--rounds must be >= 1, got 0"),
    ],
)
def test_step_overhead_refuses_bad_arguments_before_starting_anything(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from fovea.bench import step_overhead

    with pytest.raises(SystemExit) as exit_info:
        step_overhead.main(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(f": error: {message}")


def test_json_schema_flag_puts_a_response_format_in_every_request(tmp_path: Any) -> None:
    from fovea.bench.prompts import Prompt
    from fovea.bench.serving import parse_args, request_body

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    path = tmp_path / "s.json"
    path.write_text(json.dumps(schema))
    args = parse_args(["--model", "m", "--tokenizer", "t", "--json-schema", str(path)])
    body = request_body(args, Prompt("hi", [1]), 8)
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "bench", "schema": schema},
    }
    plain = request_body(parse_args(["--model", "m", "--tokenizer", "t"]), Prompt("hi", [1]), 8)
    assert "response_format" not in plain
