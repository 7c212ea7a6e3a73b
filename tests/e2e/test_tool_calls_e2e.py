"""Tool calling end to end with the openai client, on a tiny random Qwen2 served with Qwen2.5's
chat template (tests/fixtures/tool_models.py): the parser is found from the template (hermes);
tool_choice "required" and a named tool are enforced by the grammar, so random weights still
call a tool with arguments that satisfy its schema; a whole round trip (call, tool result,
answer) renders the history as transformers does (prompt_tokens equal); "none" calls nothing;
streamed n=2 ends each choice with "tool_calls"; bad tools are 400s with exact messages while
the server keeps serving."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from server_harness import Server, serve_module
from tool_models import make_tiny_tool_model

pytestmark = pytest.mark.slow

MODEL = "tiny-tools"
# Finite arguments (an enum and a one-digit integer), so a random model under the grammar
# always ends its call well within max_tokens.
SET_MODE = {
    "type": "function",
    "function": {
        "name": "set_mode",
        "description": "Switch the lamp",
        "parameters": {
            "type": "object",
            "properties": {
                "mode": {"type": "string", "enum": ["on", "off"]},
                "level": {"type": "integer", "minimum": 1, "maximum": 9},
            },
            "required": ["mode", "level"],
        },
    },
}
GET_TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {}, "required": []},
    },
}
TOOLS = [SET_MODE, GET_TIME]
ASK = [{"role": "user", "content": "Turn the lamp on, please."}]
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_tool_model(tmp_path_factory.mktemp("tiny-tools"))


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from serve_module(
        model_dir, "--served-model-name", MODEL, "--max-total-tokens", "8000",
        logs=tmp_path_factory,
    )  # fmt: skip


@pytest.fixture(scope="module")
def hf_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _hf_prompt_tokens(tok: Any, messages: list[dict[str, Any]], tools: Any = None) -> int:
    ids = tok.apply_chat_template(
        messages, tools=tools, tokenize=True, add_generation_prompt=True, return_dict=False
    )
    return len(ids)


def _check_set_mode(arguments: str) -> None:
    args = json.loads(arguments)
    assert set(args) == {"mode", "level"}
    assert args["mode"] in ("on", "off") and 1 <= args["level"] <= 9


def test_the_parser_is_found_from_the_template(server: Server) -> None:
    info = httpx.get(server.base + "/get_server_info", timeout=10).json()
    assert info["tool_call_parser"] == "hermes"


def test_required_round_trip(client: openai.OpenAI, hf_tokenizer: Any) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[SET_MODE], tool_choice="required", max_tokens=200,
        temperature=0,
    )  # fmt: skip
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.function.name == "set_mode"
    assert call.id.startswith("call_") and len(call.id) == 5 + 24
    _check_set_mode(call.function.arguments)
    assert r.usage is not None
    assert r.usage.prompt_tokens == _hf_prompt_tokens(hf_tokenizer, ASK, [SET_MODE])
    # The call and its result go back as history; the model answers (tool_choice auto).
    history = [
        *ASK,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"ok": true}'},
    ]
    answer = client.chat.completions.create(
        model=MODEL, messages=history, tools=TOOLS, max_tokens=5, temperature=0
    )
    hf_history = [
        *ASK,
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {
                        "name": "set_mode",
                        "arguments": json.loads(call.function.arguments),
                    },
                }
            ],
        },
        history[2],
    ]
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == _hf_prompt_tokens(hf_tokenizer, hf_history, TOOLS)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_a_named_tool_is_the_one_called(client: openai.OpenAI) -> None:
    for name, check in (("get_time", None), ("set_mode", _check_set_mode)):
        r = client.chat.completions.create(
            model=MODEL, messages=ASK, tools=TOOLS, max_tokens=200, temperature=0,
            tool_choice={"type": "function", "function": {"name": name}},
            parallel_tool_calls=False,
        )  # fmt: skip
        calls = r.choices[0].message.tool_calls or []
        assert [c.function.name for c in calls] == [name]
        assert r.choices[0].finish_reason == "tool_calls"
        if check is not None:
            check(calls[0].function.arguments)
        else:
            assert json.loads(calls[0].function.arguments) == {}


def test_none_calls_nothing(client: openai.OpenAI, hf_tokenizer: Any) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=8
    )
    assert r.choices[0].message.tool_calls is None
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage is not None  # rendered without tools
    assert r.usage.prompt_tokens == _hf_prompt_tokens(hf_tokenizer, ASK)
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=8, stream=True
        )
    )
    assert not any(c.choices and c.choices[0].delta.tool_calls for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_streamed_required_with_two_choices(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=200, n=2,
        stream=True, temperature=1.0, seed=7,
    )  # fmt: skip
    names: dict[tuple[int, int], str] = {}
    arguments: dict[tuple[int, int], str] = {}
    finish: dict[int, str | None] = {}
    for chunk in stream:
        for c in chunk.choices:
            assert not c.delta.content  # the calls are never content
            for t in c.delta.tool_calls or []:
                key = (c.index, t.index)
                if t.function and t.function.name:
                    assert key not in names and t.id and t.type == "function"
                    names[key] = t.function.name
                arguments[key] = arguments.get(key, "") + (
                    (t.function and t.function.arguments) or ""
                )
            if c.finish_reason is not None:
                finish[c.index] = c.finish_reason
    assert finish == {0: "tool_calls", 1: "tool_calls"}
    assert {i for i, _ in names} == {0, 1}
    for key, name in names.items():
        if name == "set_mode":
            _check_set_mode(arguments[key])
        else:
            assert name == "get_time" and json.loads(arguments[key]) == {}


def test_strict_auto_is_served(client: openai.OpenAI) -> None:
    strict = {**SET_MODE, "function": {**SET_MODE["function"], "strict": True}}
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[strict, GET_TIME], max_tokens=16, temperature=0
    )
    for call in r.choices[0].message.tool_calls or []:
        if call.function.name == "set_mode":
            _check_set_mode(call.function.arguments)


@pytest.mark.parametrize(
    ("body", "message", "param"),
    [
        (
            {
                "tool_choice": "required",
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"type": "unknown_type"}},
                    }
                ],
            },
            "tools.0.function has an invalid 'parameters' schema: 'unknown_type' is not valid under any of the given schemas",
            "tools.0",
        ),
        (
            {
                "tools": TOOLS,
                "tool_choice": {"type": "function", "function": {"name": "nonexistent_function"}},
            },
            "Tool 'nonexistent_function' not found in tools list",
            "tool_choice",
        ),
        (
            {"tool_choice": "required"},
            "tool_choice 'required' needs tools: none were given",
            "tool_choice",
        ),
        (
            {"tools": [{"type": "function", "function": {"description": "no name"}}]},
            "tools.0.function.name is required: a non-empty string",
            "tools.0",
        ),
    ],
)
def test_bad_tools_are_400s_and_the_server_keeps_serving(
    server: Server, client: openai.OpenAI, body: dict[str, Any], message: str, param: str
) -> None:
    r = httpx.post(server.base + CHAT, json={"messages": ASK, "max_tokens": 4, **body}, timeout=30)
    assert r.status_code == 400
    assert (r.json()["error"]["message"], r.json()["error"]["param"]) == (message, param)
    ok = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2)
    assert ok.choices[0].finish_reason in ("stop", "length")
