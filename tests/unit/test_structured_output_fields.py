"""Structured output before any model runs: request fields -> SamplingParams.grammar
(server/structured_output.py, openai_protocol.py) and the tokenizer service's check
(tokenizer_service/grammar.py), each refusal with its exact message."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from tiny_models import make_tokenizer

from fovea.common.messages import GenerateRequest, RequestError, TokenizedRequest
from fovea.common.model_config import ModelInfo
from fovea.common.sampling import Grammar, SamplingParams
from fovea.server.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    native_sampling,
    unsupported_field,
)
from fovea.server.request_build import APIError
from fovea.server.structured_output import JSON_OBJECT, request_grammar
from fovea.tokenizer_service.chat_templates import ChatRenderer
from fovea.tokenizer_service.grammar import GrammarChecker, unenforceable
from fovea.tokenizer_service.tokenizer import Tokenizer

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
MESSAGES = [{"role": "user", "content": "hi"}]


def refusal(fn: Any, *args: Any) -> tuple[int, str, str | None]:
    with pytest.raises(APIError) as e:
        fn(*args)
    return e.value.status, e.value.message, e.value.param


# ---------------------------------------------------------------- HTTP fields


def test_response_formats_become_grammars() -> None:
    def chat(**kw: Any) -> Grammar | None:
        return ChatCompletionRequest(messages=MESSAGES, **kw).sampling().grammar  # type: ignore[arg-type]

    assert chat() is None
    assert chat(response_format={"type": "text"}) is None
    assert chat(response_format={"type": "json_object"}) == JSON_OBJECT
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}
    assert chat(response_format=fmt) == Grammar("json_schema", json.dumps(SCHEMA))
    assert chat(regex="[ab]+") == Grammar("regex", "[ab]+")
    assert chat(ebnf='root ::= "a"') == Grammar("ebnf", 'root ::= "a"')
    assert chat(json_schema='{"type": "string"}') == Grammar("json_schema", '{"type": "string"}')
    tag = {"type": "structural_tag", "format": {"type": "const_string", "value": "hi"}}
    assert chat(response_format=tag) == Grammar("structural_tag", json.dumps(tag))
    # Completions take the same fields; null asks for nothing.
    body = CompletionRequest(prompt="p", regex="a", ebnf=None, response_format=None)
    assert body.sampling().grammar == Grammar("regex", "a")
    assert unsupported_field(ChatCompletionRequest(messages=MESSAGES, regex="a")) is None  # type: ignore[arg-type]


def test_malformed_and_conflicting_constraints_are_refused() -> None:
    assert refusal(request_grammar, {"type": "xml"}, None, None, None) == (
        400,
        "unsupported parameter: response_format.type='xml' (Fovea serves text, json_object, "
        "json_schema, structural_tag)",
        "response_format",
    )
    assert refusal(request_grammar, {"type": "json_schema"}, None, None, None) == (
        400,
        "response_format.json_schema must be an object with the schema under 'schema'",
        "response_format",
    )
    no_schema = {"type": "json_schema", "json_schema": {"name": "x"}}
    assert refusal(request_grammar, no_schema, None, None, None) == (
        400,
        "response_format.json_schema.schema must be a JSON schema (an object)",
        "response_format",
    )
    assert refusal(request_grammar, {"type": "json_object"}, "a+", None, None) == (
        400,
        "at most one output constraint per request: got response_format and regex",
        "regex",
    )
    assert refusal(request_grammar, None, None, 'root ::= "a"', "{}") == (
        400,
        "at most one output constraint per request: got ebnf and json_schema",
        "json_schema",
    )


def test_native_sampling_params_take_sglangs_keys() -> None:
    sp = native_sampling({"json_schema": json.dumps(SCHEMA), "stop_token_ids": [9]}, False, 0)
    assert sp.grammar == Grammar("json_schema", json.dumps(SCHEMA))
    assert sp.stop_token_ids == [9] and sp.max_new_tokens == 128
    assert native_sampling({"json_schema": None, "regex": None}, False, 0).grammar is None
    assert native_sampling({"ebnf": 'root ::= "a"'}, False, 0).grammar == Grammar(
        "ebnf", 'root ::= "a"'
    )
    assert native_sampling({"structural_tag": "{}"}, False, 0).grammar == Grammar(
        "structural_tag", "{}"
    )
    assert refusal(native_sampling, {"regex": "a", "ebnf": "b"}, False, 0) == (
        400,
        "at most one output constraint per request: got regex and ebnf",
        "ebnf",
    )
    assert refusal(native_sampling, {"regex": 5}, False, 0) == (
        400,
        "sampling_params.regex must be a string",
        "sampling_params.regex",
    )


# ---------------------------------------------------------------- the tokenizer service's check


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoTokenizer

    d: Path = tmp_path_factory.mktemp("tok")
    make_tokenizer(d)
    return AutoTokenizer.from_pretrained(d)


MODEL = ModelInfo(
    path="m",
    architecture="LlamaForCausalLM",
    model_type="llama",
    context_length=256,
    vocab_size=512,
    eos_token_ids=[2],
)


@pytest.fixture(scope="module")
def checker(hf: Any) -> GrammarChecker:
    pytest.importorskip("xgrammar")
    return GrammarChecker(hf, MODEL)


def problem(checker: GrammarChecker, kind: str, spec: str) -> str:
    from fovea.common.grammar_compiler import GrammarError

    with pytest.raises(GrammarError) as e:
        asyncio.run(checker.check(Grammar(kind, spec)))
    return e.value.message


@pytest.mark.parametrize(
    ("schema", "found"),
    [
        ({"type": "array", "uniqueItems": True}, "'uniqueItems' at the root"),
        ({"properties": {"n": {"not": {"const": 1}}}}, "'not' at properties.n"),
        ({"if": {}, "then": {}}, "'if' at the root"),
        ({"$defs": {"D": {"dependentRequired": {}}}}, "'dependentRequired' at $defs.D"),
        ({"items": {"contains": {}}}, "'contains' at items"),
        (
            {"anyOf": [{"type": "string"}, {"type": "string", "pattern": "^a+$", "minLength": 3}]},
            "'minLength'/'maxLength' together with 'pattern' or 'format' at anyOf.1",
        ),
        ({"type": "number", "multipleOf": 0.5}, "'multipleOf' on a non-integer at the root"),
        (
            {"allOf": [{"type": "integer"}, {"maximum": 5}]},
            "'allOf' with more than one schema at the root",
        ),
        (
            {"type": "string", "pattern": "^a(?=b)"},
            "a lookahead or lookbehind in 'pattern' at the root",
        ),
    ],
)
def test_unenforceable_keywords_are_named(schema: dict[str, Any], found: str) -> None:
    assert unenforceable(schema) == found


def test_enforceable_schemas_pass_the_walk() -> None:
    # Property names that are keywords elsewhere, enum values, and what xgrammar enforces.
    schema = {
        "type": "object",
        "properties": {
            "not": {"enum": [{"not": 1}]},
            "n": {"type": "integer", "multipleOf": 3, "minimum": 0, "maximum": 30},
            "s": {"type": "string", "minLength": 1, "maxLength": 4},
            "p": {"type": "string", "pattern": "^[a-z]+$"},
            "u": {"type": "array", "uniqueItems": False, "allOf": [{"maxItems": 3}]},
        },
    }
    assert unenforceable(schema) is None


def test_checker_messages(checker: GrammarChecker) -> None:
    asyncio.run(checker.check(Grammar("json_schema", json.dumps(SCHEMA))))
    asyncio.run(checker.check(JSON_OBJECT))
    asyncio.run(checker.check(Grammar("regex", r"\d{3}-[a-z]+")))
    asyncio.run(checker.check(Grammar("ebnf", 'root ::= "Hello" | "Hi" | "Hey"')))
    assert problem(checker, "json_schema", "INVALID") == (
        "invalid JSON schema: not JSON: Expecting value: line 1 column 1 (char 0)"
    )
    assert problem(checker, "json_schema", "[1]") == (
        "invalid JSON schema: a schema is a JSON object, got list"
    )
    assert problem(checker, "json_schema", '{"type": "foo"}') == (
        'invalid JSON schema: Unsupported type "foo"'
    )
    assert problem(checker, "json_schema", '{"type": "array", "uniqueItems": true}') == (
        "JSON schema: 'uniqueItems' at the root is not supported (structured output cannot "
        "enforce it)"
    )
    assert problem(checker, "regex", "a(b") == (
        "invalid regex: Regex parsing error at position 4: The parenthesis is not closed."
    )
    assert problem(checker, "ebnf", "root ::= foo") == (
        'invalid EBNF grammar: EBNF parser error at line 1, column 10: Rule "foo" is not defined'
    )
    assert problem(checker, "structural_tag", "{").startswith("invalid structural tag: ")


def test_a_slow_compile_is_refused_and_the_loop_keeps_running(hf: Any) -> None:
    pytest.importorskip("xgrammar")
    slow = GrammarChecker(hf, MODEL, timeout_s=1e-4)
    # Nested and wide enough that no first compile takes under 0.1 ms.
    schema = {
        "type": "object",
        "properties": {
            f"p{i}": {"type": "array", "items": {"type": "string", "pattern": f"^[a-z]{{{i}}}$"}}
            for i in range(1, 30)
        },
    }
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    async def main() -> str:
        from fovea.common.grammar_compiler import GrammarError

        await asyncio.wrap_future(slow._compiler_future())  # built once, not timed
        task = asyncio.create_task(ticker())
        try:
            await slow.check(Grammar("json_schema", json.dumps(schema)))
        except GrammarError as e:
            return e.message
        finally:
            task.cancel()
        return "compiled"

    assert asyncio.run(main()) == (
        "compiling the JSON schema took longer than 0.0001 s (--grammar-compile-timeout); "
        "simplify it"
    )
    assert ticks > 0


def test_without_xgrammar_a_grammar_is_a_400(hf: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import fovea.common.grammar_compiler as gc

    def missing() -> Any:
        raise gc.GrammarUnavailable(
            "structured output needs the xgrammar package, which is not installed (test); "
            f"install it with: {gc.XGRAMMAR_INSTALL}"
        )

    monkeypatch.setattr(gc, "import_xgrammar", missing)
    svc = Tokenizer(hf, MODEL, ChatRenderer(hf, None), grammars=GrammarChecker(hf, MODEL))
    req = GenerateRequest(rid="r", sampling=SamplingParams(grammar=JSON_OBJECT), text="hi")
    assert svc.goes_async(req)
    (err,) = asyncio.run(svc.handle_generate_async(req)).to_server
    assert isinstance(err, RequestError)
    assert (err.status, err.param) == (400, "response_format")
    assert err.message.endswith(
        "install it with: pip install --no-deps xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2"
    )


def test_tokenizer_refuses_a_bad_grammar_and_passes_a_good_one(hf: Any) -> None:
    pytest.importorskip("xgrammar")
    svc = Tokenizer(hf, MODEL, ChatRenderer(hf, None))
    good = GenerateRequest(
        rid="g", sampling=SamplingParams(grammar=Grammar("regex", "a+")), text="x"
    )
    (treq,) = asyncio.run(svc.handle_generate_async(good)).to_scheduler
    assert isinstance(treq, TokenizedRequest) and treq.sampling.grammar == Grammar("regex", "a+")
    # The synchronous path (no event loop) checks too.
    bad = GenerateRequest(rid="b", sampling=SamplingParams(grammar=Grammar("ebnf", "x")), text="x")
    (err,) = svc.handle_generate(bad).to_server
    assert isinstance(err, RequestError)
    assert (err.status, err.param) == (400, "ebnf")
    assert err.message.startswith("invalid EBNF grammar: ")


def test_integers_without_bounds_get_the_int64_range() -> None:
    from fovea.common.grammar_compiler import int64_bounded

    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "integer"},
            "b": {"type": "integer", "minimum": 0},
            "c": {"type": "integer", "exclusiveMaximum": 10, "minimum": 1},
            "d": {"type": "array", "items": {"type": "integer"}},
        },
    }
    out = json.loads(int64_bounded(json.dumps(schema)))
    props = out["properties"]
    assert props["a"] == {"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1}
    assert props["b"] == {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}
    assert props["c"] == schema["properties"]["c"]  # type: ignore[index]
    assert props["d"]["items"] == props["a"]
    unchanged = json.dumps({"type": "integer", "minimum": 0, "maximum": 5})
    assert int64_bounded(unchanged) is unchanged
    assert int64_bounded("not json") == "not json"


def test_structural_tags_compile_with_bounded_integers(checker: GrammarChecker) -> None:
    from fovea.common.grammar_compiler import _bound_tag_schemas

    args = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    tag = {
        "type": "structural_tag",
        "format": {
            "type": "triggered_tags",
            "triggers": ["<call>"],
            "tags": [
                {
                    "begin": "<call>",
                    "content": {"type": "json_schema", "json_schema": args},
                    "end": "</call>",
                }
            ],
        },
    }
    legacy = {
        "type": "structural_tag",
        "structures": [{"begin": "<f>", "schema": args, "end": "</f>"}],
        "triggers": ["<f>"],
    }
    for spec in (tag, legacy):
        asyncio.run(checker.check(Grammar("structural_tag", json.dumps(spec))))
        bounded = json.loads(json.dumps(spec))
        _bound_tag_schemas(bounded)
        assert json.dumps(bounded).count('"maximum": 9223372036854775807') == 1
