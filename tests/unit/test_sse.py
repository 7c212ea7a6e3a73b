"""SSE events survive line splitters: characters that str.splitlines (httpx, the openai client)
breaks on are escaped inside the JSON, so a model emitting them cannot cut an event in two."""

from __future__ import annotations

import json

from fovea.server.responses import sse_event


def test_sse_event_escapes_unicode_line_breaks() -> None:
    text = "a\u2028b\x85c\u2029d\ne\rf"
    event = sse_event({"t": text})
    assert event == b'data: {"t":"a\\u2028b\\u0085c\\u2029d\\ne\\rf"}\n\n'
    payload = event.decode().removeprefix("data: ").removesuffix("\n\n")
    assert payload.splitlines() == [payload]
    assert json.loads(payload) == {"t": text}
