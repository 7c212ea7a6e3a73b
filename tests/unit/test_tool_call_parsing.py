"""Tool calls read from fixed model outputs (server/tool_calls/): per format, the exact content
and calls of a whole answer, the exact delta sequence of a streamed one, no markup in content
whatever the chunking (a marker split across deltas included), and streamed pieces that join
into the whole answer's arguments."""

from __future__ import annotations

import json
import random
import re
from typing import Any

import pytest

from fovea.server.tool_calls import formats
from fovea.server.tool_calls.partial_json import PartialJSONError, dumps, parse_partial
from fovea.server.tool_calls.streaming import ToolCallParser, parse_complete

NAMES = frozenset({"add", "get_weather"})
ID = re.compile(r"call_[0-9a-f]{24}")


def _ids_out(value: Any) -> Any:
    """Every call id checked for OpenAI's shape and replaced by "ID"."""
    text = json.dumps(value)
    assert all(ID.fullmatch(i) for i in re.findall(r'"id": "([^"]*)"', text))
    return json.loads(ID.sub("ID", text))


def _whole(fmt: str, text: str, names: frozenset[str] = NAMES) -> tuple[str, list[Any]]:
    content, calls = parse_complete(ToolCallParser(fmt, names), text)
    return content, _ids_out(calls)


def _streamed(fmt: str, pieces: list[str]) -> list[tuple[str, list[Any]]]:
    parser = ToolCallParser(fmt, NAMES)
    out = []
    for i, piece in enumerate(pieces):
        parsed = parser.feed(piece, final=i == len(pieces) - 1)
        out.append((parsed.content, _ids_out(parsed.tool_calls)))
    return out


def _call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": "ID", "type": "function", "function": {"name": name, "arguments": arguments}}


def _first(index: int, name: str, arguments: str = "") -> dict[str, Any]:
    return {"index": index, **_call(name, arguments)}


def _more(index: int, arguments: str) -> dict[str, Any]:
    return {"index": index, "function": {"arguments": arguments}}


HERMES_TEXT = (
    'I will add them.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": "hello"}}\n'
    '</tool_call>\n<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris 🙂"}}\n</tool_call>'
)
LLAMA3_TEXT = (
    '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "add", "parameters": {}}'
)
PYTHONIC_TEXT = '<|python_start|>[get_weather(city="Paris"), add(a=1, b=[2, "x]"])]<|python_end|>'
ARRAY_TEXT = '[{"name": "add", "parameters": {"a": 1, "b": 2}}, {"name": "get_weather", "parameters": {"city": "Paris"}}]'


@pytest.mark.parametrize(
    ("fmt", "text", "content", "calls"),
    [
        (
            formats.HERMES,
            HERMES_TEXT,
            "I will add them.",
            [_call("add", '{"a": 1, "b": "hello"}'), _call("get_weather", '{"city": "Paris 🙂"}')],
        ),
        # "parameters" is taken for "arguments"; a block cut off after whole JSON is a call.
        (
            formats.HERMES,
            '<tool_call>\n{"name": "add", "parameters": {"a": 2}}',
            "",
            [_call("add", '{"a": 2}')],
        ),
        (formats.HERMES, "No tools needed.\n", "No tools needed.\n", []),
        (
            formats.LLAMA3,
            LLAMA3_TEXT,
            "",
            [_call("get_weather", '{"city": "Paris"}'), _call("add", "{}")],
        ),
        (
            formats.LLAMA3,
            'Let me check. <|python_tag|>{"name": "add", "parameters": {"a": 1}}',
            "Let me check.",
            [_call("add", '{"a": 1}')],
        ),
        # JSON that names no tool is the model's answer.
        (formats.LLAMA3, '{"answer": 4}', '{"answer": 4}', []),
        (
            formats.PYTHONIC,
            PYTHONIC_TEXT,
            "",
            [_call("get_weather", '{"city": "Paris"}'), _call("add", '{"a": 1, "b": [2, "x]"]}')],
        ),
        (
            formats.PYTHONIC,
            "See [1] and [add(a=1)] done",
            "See [1] and done",
            [_call("add", '{"a": 1}')],
        ),
        (formats.PYTHONIC, "[x for x in y]", "[x for x in y]", []),
        (
            formats.JSON_ARRAY,
            ARRAY_TEXT,
            "",
            [_call("add", '{"a": 1, "b": 2}'), _call("get_weather", '{"city": "Paris"}')],
        ),
        # Cut off by max_tokens: no call, the text is kept as content.
        (formats.JSON_ARRAY, '[{"name": "add", "para', '[{"name": "add", "para', []),
    ],
)
def test_whole_answers(fmt: str, text: str, content: str, calls: list[Any]) -> None:
    assert _whole(fmt, text) == (content, calls)


def test_parallel_calls_off_keeps_the_first() -> None:
    content, calls = parse_complete(ToolCallParser(formats.HERMES, NAMES, False), HERMES_TEXT)
    assert (content, _ids_out(calls)) == (
        "I will add them.",
        [_call("add", '{"a": 1, "b": "hello"}')],
    )


def test_hermes_stream_exact_deltas() -> None:
    pieces = [
        "I will",
        " add them.\n<tool",
        '_call>\n{"name": "ad',
        'd", "arguments": {"a": 1',
        ', "b": "hel',
        'lo"}}\n</tool_call>',
        '\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        "",
    ]
    assert _streamed(formats.HERMES, pieces) == [
        ("I will", []),
        (" add them.", []),  # "\n<tool" held back: it may open a call
        ("", []),
        ("", [_first(0, "add")]),  # the name alone; the number 1 may still grow
        ("", [_more(0, '{"a": 1, "b": "hel')]),
        ("", [_more(0, 'lo"}')]),
        ("", [_first(1, "get_weather", '{"city": "Paris"}')]),
        ("", []),
    ]


def test_llama3_stream_exact_deltas() -> None:
    pieces = [
        '  {"name": "get_',
        'weather", "parameters": {"city": "Pa',
        'ris"}}; {"name": "add", "parameters": {}}',
        "",
    ]
    assert _streamed(formats.LLAMA3, pieces) == [
        ("", []),
        ("", [_first(0, "get_weather")]),
        ("", [_more(0, '{"city": "Paris"}'), _first(1, "add", "{}")]),
        ("", []),
    ]


def test_pythonic_stream_emits_whole_calls_at_the_bracket() -> None:
    pieces = ['<|python_start|>[get_weather(city="Pa', 'ris"), add(a=1, b=2)]<|python_end|>', ""]
    assert _streamed(formats.PYTHONIC, pieces) == [
        ("", []),
        ("", [_first(0, "get_weather", '{"city": "Paris"}'), _first(1, "add", '{"a": 1, "b": 2}')]),
        ("", []),
    ]


def test_json_array_stream_exact_deltas() -> None:
    pieces = [
        '[{"name": "add", "para',
        'meters": {"a": 1, "b": 2}}, {"name": "get_weather", "parameters": {"city": "Paris"}}]',
        "",
    ]
    assert _streamed(formats.JSON_ARRAY, pieces) == [
        ("", [_first(0, "add")]),
        ("", [_more(0, '{"a": 1, "b": 2}'), _first(1, "get_weather", '{"city": "Paris"}')]),
        ("", []),
    ]


def test_a_marker_split_across_deltas_never_leaks() -> None:
    for pieces in (
        ["Hi <tool", "_call>", '\n{"name": "add"}\n</tool_call>'],
        ["Hi <", "tool_c", "all>\n{}"],
    ):
        out = _streamed(formats.HERMES, [*pieces, ""])
        assert "".join(c for c, _ in out) == "Hi"
    # A held prefix that turns out not to be the marker is sent, in order.
    out = _streamed(formats.HERMES, ["a <tool", "box> b", ""])
    assert [c for c, _ in out] == ["a", " <toolbox> b", ""]


@pytest.mark.parametrize(
    ("fmt", "text"),
    [
        (formats.HERMES, HERMES_TEXT),
        (
            formats.HERMES,
            "Thinking... <tool_call>\n"
            + '{"name": "add", "arguments": {"a": "é\\"\\u00e9\\ud83d\\ude42"}}',
        ),
        (formats.LLAMA3, LLAMA3_TEXT),
        (
            formats.LLAMA3,
            'Hm. <|python_tag|>{"name": "add", "parameters": {"a": [1, {"b": null}]}}',
        ),
        (formats.PYTHONIC, "Sure: " + PYTHONIC_TEXT + " ok"),
        (formats.JSON_ARRAY, ARRAY_TEXT),
    ],
)
def test_any_chunking_streams_the_whole_answer(fmt: str, text: str) -> None:
    """Streamed content joins into the whole answer's content, streamed argument pieces into its
    arguments; no content ever holds markup."""
    whole = _whole(fmt, text)
    rng = random.Random(0)
    for _ in range(150):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, min(12, len(text) - 1))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        out = _streamed(fmt, [*pieces, ""])
        content = "".join(c for c, _ in out)
        calls: dict[int, dict[str, Any]] = {}
        for entry in (e for _, entries in out for e in entries):
            if "id" in entry:
                assert entry["index"] not in calls and entry["index"] == len(calls)
                calls[entry["index"]] = _call(entry["function"]["name"], "")
            calls[entry["index"]]["function"]["arguments"] += entry["function"]["arguments"]
        assert (content, list(calls.values())) == whole, pieces
        assert not any(m in content for m in ("<tool", "<|python", "</tool"))


def test_partial_json_stable_prefix() -> None:
    assert parse_partial('{"a": "hel') == ({"a": "hel"}, 2)
    assert parse_partial('{"a": 12') == ({}, 1)  # a number may grow digits
    assert parse_partial('{"a": 12,') == ({"a": 12}, 1)
    assert parse_partial('{"a": [1, {"b": tr') == ({"a": [1, {}]}, 3)
    assert parse_partial('{"a": "x\\u00') == ({"a": "x"}, 2)  # an escape cut short
    assert parse_partial('{"a": "\\ud83d') == ({"a": ""}, 2)  # half a surrogate pair
    assert parse_partial('{"a": 1}') == ({"a": 1}, 0)
    with pytest.raises(PartialJSONError):
        parse_partial("  ")
    with pytest.raises(PartialJSONError):
        parse_partial('{"a" 1')


def test_partial_json_prefixes_of_random_documents_stay_prefixes() -> None:
    rng = random.Random(1)

    def draw(depth: int = 0) -> Any:
        r = rng.random()
        if depth > 3 or r < 0.3:
            return rng.choice([0, -2.5, 1e10, True, None, 'q"\\\n', "日本🙂", ""])
        if r < 0.65:
            return {f"k{i}": draw(depth + 1) for i in range(rng.randint(0, 3))}
        return [draw(depth + 1) for _ in range(rng.randint(0, 3))]

    for _ in range(300):
        doc = {"a": draw()}
        text = json.dumps(doc, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 1]))
        final, sent = dumps(doc), ""
        for k in range(1, len(text) + 1):
            try:
                value, unstable = parse_partial(text[:k])
            except PartialJSONError:
                continue
            stable = dumps(value)[: len(dumps(value)) - unstable]
            assert stable.startswith(sent) and final.startswith(stable), text[:k]
            sent = stable
        assert sent == final


@pytest.mark.parametrize(
    ("template", "fmt"),
    [
        ('{{- "<tool_call>\\n" }}{{ tool_call.arguments | tojson }}', formats.HERMES),
        ("<|start_header_id|>ipython<|end_header_id|>", formats.LLAMA3),
        ("{{- '<|python_tag|>' }}", formats.LLAMA3),
        (
            "[func_name1(params_name1=params_value1, params_name2=params_value2...)] ipython",
            formats.PYTHONIC,
        ),
        ("{% for m in messages %}{{ m.content }}{% endfor %}", None),
        (None, None),
    ],
)
def test_format_from_the_chat_template(template: str | None, fmt: str | None) -> None:
    assert formats.detect_format(template) == fmt
