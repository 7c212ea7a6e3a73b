"""Chat answers with tool calls (server/responses.py ChatRenderer over server/tool_calls/):
the whole message (content null beside calls, finish_reason tool_calls, "length" kept, nothing
parsed under tool_choice none) and the exact stream chunks, n=2 included, with no markup in
any content delta."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from fovea.common.messages import TextDelta
from fovea.common.sampling import SamplingParams
from fovea.server.responses import ChatRenderer
from fovea.server.tool_calls.plan import plan_tools

TOOLS = [
    {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
]


def _delta(index: int, text: str, finish: str | None = None) -> TextDelta:
    return TextDelta("r", index, text, [], None, finish, None if finish is None else 2, 10, 0, 1)


def _no_ids(value: Any) -> Any:
    return json.loads(re.sub(r'"call_[0-9a-f]{24}"', '"ID"', json.dumps(value)))


def _renderer(tool_choice: Any, n: int = 1) -> ChatRenderer:
    plan = plan_tools(TOOLS, tool_choice, None, "hermes")
    return ChatRenderer("r", "m", SamplingParams(n=n), False, tools=plan)


async def _collect(render: ChatRenderer, deltas: list[TextDelta]) -> Any:
    async def gen() -> Any:
        for d in deltas:
            yield d

    return await render.collect(gen())


def test_whole_answer_with_calls() -> None:
    text = 'Let me see.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    body = asyncio.run(_collect(_renderer("auto"), [_delta(0, text, "stop")]))
    assert _no_ids(body["choices"][0]["message"]) == {
        "role": "assistant",
        "content": "Let me see.",
        "reasoning_content": None,
        "tool_calls": [
            {
                "id": "ID",
                "type": "function",
                "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'},
            }
        ],
    }
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    calls_only = '[{"name": "get_weather", "parameters": {"city": "Paris"}}]'
    body = asyncio.run(_collect(_renderer("required"), [_delta(0, calls_only, "stop")]))
    assert body["choices"][0]["message"]["content"] is None  # OpenAI's null beside calls
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    body = asyncio.run(_collect(_renderer("none"), [_delta(0, "<tool_call>x", "stop")]))
    assert body["choices"][0]["message"]["tool_calls"] is None
    assert (body["choices"][0]["message"]["content"], body["choices"][0]["finish_reason"]) == (
        "<tool_call>x",
        "stop",
    )
    # Cut off by max_tokens: the calls sent so far stay, the reason stays "length".
    body = asyncio.run(_collect(_renderer("auto"), [_delta(0, text, "length")]))
    assert body["choices"][0]["finish_reason"] == "length"


def test_streamed_answer_chunks_for_two_choices() -> None:
    render = _renderer("required", n=2)
    deltas = [
        _delta(0, '[{"name": "add", "param'),
        _delta(1, '[{"name": "get_weather", "parameters": {"city": "Tokyo"}}]', "stop"),
        _delta(0, 'eters": {"a": 1, "b": 2}}]', "stop"),
    ]
    got = [
        (c["choices"][0]["index"], c["choices"][0]["delta"], c["choices"][0]["finish_reason"])
        for d in deltas
        for c in render.chunks(d)
    ]
    first = {"role": "assistant", "content": "", "reasoning_content": None}
    assert _no_ids(got) == _no_ids(
        [
            (0, first, None),
            (
                0,
                {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "ID",
                            "type": "function",
                            "function": {"name": "add", "arguments": ""},
                        }
                    ],
                    "reasoning_content": None,
                },
                None,
            ),
            (1, first, None),
            (
                1,
                {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "ID",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Tokyo"}'},
                        }
                    ],
                    "reasoning_content": None,
                },
                None,
            ),
            (1, {"reasoning_content": None}, "tool_calls"),
            (
                0,
                {
                    "tool_calls": [{"index": 0, "function": {"arguments": '{"a": 1, "b": 2}'}}],
                    "reasoning_content": None,
                },
                None,
            ),
            (0, {"reasoning_content": None}, "tool_calls"),
        ]
    )


def test_streamed_content_never_holds_markup() -> None:
    render = _renderer("auto")
    pieces = ["Hi <tool", '_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>']
    deltas = [_delta(0, pieces[0]), _delta(0, pieces[1], "stop")]
    contents = [c["choices"][0]["delta"].get("content") for d in deltas for c in render.chunks(d)]
    assert [c for c in contents if c] == ["Hi"]
