"""The request side of tool calling: tools checked with exact 400s, tool_choice planned into
rendered tools, a parse format and a grammar (equal to xgrammar's own structural tags, and
accepting the calls the parser reads); tools and tool history rendered by the chat template as
transformers renders them; the parser found from the template at launch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tool_models import QWEN2_5_TEMPLATE

from fovea.common.config import ServerArgs
from fovea.common.messages import ChatMessage
from fovea.server.request_build import APIError
from fovea.server.tool_calls import formats, grammars
from fovea.server.tool_calls.plan import history_tool_calls, plan_tools

ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Tokyo"]}},
            "required": ["city"],
        },
    },
}
TOOLS = [ADD, WEATHER]


def _refusal(*args: Any) -> tuple[str, str | None]:
    with pytest.raises(APIError) as e:
        plan_tools(*args)
    assert e.value.status == 400
    return e.value.message, e.value.param


def test_bad_tools_are_refused_by_name() -> None:
    bad_schema = {
        "type": "function",
        "function": {"name": "f", "parameters": {"type": "unknown_type"}},
    }
    message, param = _refusal([bad_schema], "required", None, "hermes")
    assert "invalid 'parameters' schema" in message and param == "tools.0"
    assert _refusal(
        [ADD], {"type": "function", "function": {"name": "nonexistent_function"}}, None, "hermes"
    ) == (
        "Tool 'nonexistent_function' not found in tools list",
        "tool_choice",
    )
    assert _refusal(None, "required", None, "hermes") == (
        "tool_choice 'required' needs tools: none were given",
        "tool_choice",
    )
    nameless = {"type": "function", "function": {"parameters": {"type": "object"}}}
    assert _refusal([nameless], "auto", None, "hermes") == (
        "tools.0.function.name is required: a non-empty string",
        "tools.0",
    )
    assert (
        _refusal([ADD, ADD], "auto", None, "hermes")[0]
        == "tools.1.function.name 'add' is not unique"
    )
    assert _refusal([{"type": "code_interpreter"}], "auto", None, "hermes")[0] == (
        "tools.0.type must be 'function', got 'code_interpreter'"
    )
    assert _refusal([ADD], "sometimes", None, "hermes")[0].endswith("got 'sometimes'")
    assert _refusal([ADD], "auto", None, "none")[0].startswith(
        "this model's chat template shows no tool-call format Fovea can parse"
    )


def test_schemas_a_grammar_cannot_enforce_are_refused_where_calls_are_enforced() -> None:
    params = {"type": "object", "properties": {"a": {"not": {"type": "string"}}}}
    loose = {"type": "function", "function": {"name": "f", "parameters": params}}
    assert _refusal([ADD, loose], "required", None, "hermes") == (
        "tools.1.function.parameters: 'not' at properties.a is not supported (tool calls cannot "
        "be held to it)",
        "tools.1",
    )
    # Not enforced: a named other tool, or auto without strict.
    assert plan_tools(
        [ADD, loose], {"type": "function", "function": {"name": "add"}}, None, "hermes"
    )
    assert plan_tools([ADD, loose], "auto", None, "hermes").grammar is None


def test_conflicting_defs_are_refused() -> None:
    def tool(name: str, kind: str) -> dict[str, Any]:
        params = {"$defs": {"x": {"type": kind}}, "properties": {"v": {"$ref": "#/$defs/x"}}}
        return {"type": "function", "function": {"name": name, "parameters": params}}

    message, _ = _refusal([tool("f", "string"), tool("g", "integer")], "required", None, "hermes")
    assert message == "Tool definition 'x' has multiple schemas, which is not supported."
    plan = plan_tools([tool("f", "string"), tool("g", "string")], "required", None, "hermes")
    assert plan.grammar is not None
    assert json.loads(plan.grammar.spec)["$defs"] == {"x": {"type": "string"}}


def _item(tool: dict[str, Any]) -> dict[str, Any]:
    function = tool["function"]
    return {
        "type": "object",
        "properties": {
            "name": {"type": "string", "enum": [function["name"]]},
            "parameters": function["parameters"],
        },
        "required": ["name", "parameters"],
    }


def test_plans() -> None:
    none = plan_tools(TOOLS, "none", None, "hermes")
    assert (none.tools, none.fmt, none.grammar) == ([], None, None)
    assert plan_tools(None, None, None, "none").fmt is None
    auto = plan_tools([ADD], None, None, "hermes")
    assert (auto.tools, auto.fmt, auto.names, auto.grammar) == ([ADD], "hermes", {"add"}, None)
    required = plan_tools(TOOLS, "required", None, "none")
    assert (required.tools, required.fmt, required.names) == (
        TOOLS,
        "json_array",
        {"add", "get_weather"},
    )
    assert required.grammar is not None and required.grammar.kind == "json_schema"
    assert json.loads(required.grammar.spec) == {
        "type": "array",
        "minItems": 1,
        "items": {"anyOf": [_item(ADD), _item(WEATHER)]},
    }
    named = plan_tools(TOOLS, {"type": "function", "function": {"name": "add"}}, False, "hermes")
    assert (named.tools, named.fmt, named.names, named.parallel) == (
        TOOLS,
        "json_array",
        {"add"},
        False,
    )
    assert named.grammar is not None
    assert json.loads(named.grammar.spec) == {
        "type": "array",
        "minItems": 1,
        "items": _item(ADD),
        "maxItems": 1,
    }
    strict = plan_tools(TOOLS, "auto", None, "hermes")
    assert strict.grammar is not None and strict.grammar.kind == "structural_tag"
    assert plan_tools(TOOLS, "auto", None, "pythonic").grammar is None  # no tag for pythonic


def test_history_tool_calls_decode_arguments() -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'},
    }
    assert history_tool_calls([call], "messages.1.tool_calls") == [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "add", "arguments": {"a": 1, "b": 2}},
        }
    ]
    broken = {"type": "function", "function": {"name": "add", "arguments": "{"}}
    with pytest.raises(APIError) as e:
        history_tool_calls([broken], "messages.1.tool_calls")
    assert e.value.param == "messages.1.tool_calls.0.function.arguments"


# ---------------------------------------------------------------- grammars against xgrammar


def test_structural_tags_equal_xgrammars_own() -> None:
    xgr = pytest.importorskip("xgrammar")
    for fmt, model in ((formats.HERMES, "qwen_3"), (formats.LLAMA3, "llama")):
        ours = grammars.structural_tag(fmt, TOOLS, parallel=True)
        theirs = xgr.get_model_structural_tag(
            model, tools=TOOLS, tool_choice="auto", reasoning=False, exclude_special_tokens=False
        ).model_dump(mode="json")
        assert ours["format"]["triggers"] == theirs["format"]["triggers"]
        assert [(t["begin"], t["end"]) for t in ours["format"]["tags"]] == [
            (t["begin"], t["end"]) for t in theirs["format"]["tags"]
        ]
        # Strict tools' arguments follow their schema; xgrammar leaves a non-strict one's free.
        assert (
            ours["format"]["tags"][1]["content"]["json_schema"] == WEATHER["function"]["parameters"]
        )


@pytest.mark.parametrize(
    ("plan_args", "accepted", "refused"),
    [
        (
            (TOOLS, "required", None, "hermes"),
            '[{"name": "add", "parameters": {"a": 1, "b": 2}}]',
            '[{"name": "get_weather", "parameters": {"city": "Rome"}}]',
        ),
        (
            (TOOLS, {"type": "function", "function": {"name": "get_weather"}}, False, "hermes"),
            '[{"name": "get_weather", "parameters": {"city": "Tokyo"}}]',
            '[{"name": "add", "parameters": {"a": 1, "b": 2}}]',
        ),
        (
            (TOOLS, "auto", None, "hermes"),
            'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>',
        ),
        (
            (TOOLS, "auto", None, "llama3"),
            '{"name": "get_weather", "parameters": {"city": "Paris"}}',
            '{"name": "get_weather", "parameters": {"town": "Paris"}}',
        ),
    ],
)
def test_grammars_accept_what_the_parser_reads(
    plan_args: tuple[Any, ...], accepted: str, refused: str
) -> None:
    xgr = pytest.importorskip("xgrammar")
    from xgrammar.testing import _is_grammar_accept_string

    plan = plan_tools(*plan_args)
    assert plan.grammar is not None
    if plan.grammar.kind == "json_schema":
        grammar = xgr.Grammar.from_json_schema(plan.grammar.spec)
    else:
        grammar = xgr.Grammar.from_structural_tag(plan.grammar.spec)
    assert _is_grammar_accept_string(grammar, accepted)
    assert not _is_grammar_accept_string(grammar, refused)
    parser = plan.parser()
    assert parser is not None
    _, calls = parser.feed(accepted, final=True)
    assert calls and calls[0]["function"]["name"] in plan.names


# ---------------------------------------------------------------- the prompt


def test_tools_and_tool_history_render_as_transformers_does() -> None:
    from tiny_models import chatml_tokenizer

    from fovea.tokenizer_service.chat_templates import ChatRenderer as TemplateRenderer

    tok = chatml_tokenizer(chat_template=QWEN2_5_TEMPLATE)
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'},
    }
    ours = [
        ChatMessage("user", "What is 1 + 2?"),
        ChatMessage("assistant", None, tool_calls=history_tool_calls([call], "m")),
        ChatMessage("tool", "3", tool_call_id="call_1"),
    ]
    hf = [
        {"role": "user", "content": "What is 1 + 2?"},
        {
            "role": "assistant",
            "tool_calls": [{**call, "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}],
        },
        {"role": "tool", "content": "3", "tool_call_id": "call_1"},
    ]
    text = TemplateRenderer(tok, None).render(ours, tools=TOOLS)
    assert text == tok.apply_chat_template(
        hf, tools=TOOLS, tokenize=False, add_generation_prompt=True
    )
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>' in text
    assert json.dumps(WEATHER) in text  # the tool as sent, key order kept


def test_the_parser_is_found_from_the_template(tmp_path: Path) -> None:
    from fovea.launcher.launch import resolve_tool_call_parser

    (tmp_path / "chat_template.jinja").write_text(QWEN2_5_TEMPLATE)
    args = ServerArgs(model_path=str(tmp_path))
    assert resolve_tool_call_parser(args, str(tmp_path)) == "hermes"
    assert (
        resolve_tool_call_parser(ServerArgs(model_path="x", chat_template="chatml"), str(tmp_path))
        == "none"
    )
    given = ServerArgs(model_path="x", tool_call_parser="pythonic")
    assert resolve_tool_call_parser(given, str(tmp_path)) == "pythonic"
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "chat_template": [
                    {"name": "default", "template": "x"},
                    {"name": "tool_use", "template": "<|python_tag|>"},
                ]
            }
        )
    )
    assert resolve_tool_call_parser(args, str(tmp_path)) == "llama3"
