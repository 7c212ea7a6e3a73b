"""Request fields that constrain the output (response_format, regex, ebnf, json_schema), turned
into SamplingParams.grammar.

OpenAI's `response_format` ({"type": "text" | "json_object" | "json_schema" | "structural_tag"})
and SGLang's extra fields `regex`, `ebnf` and `json_schema` (a schema as JSON text), on chat and
completions; /generate's `sampling_params` take `json_schema`, `regex`, `ebnf` and
`structural_tag`. At most one per request: two are a 400 naming both. Whether a grammar is
valid is the tokenizer service's check (tokenizer_service/grammar.py), which compiles it.
"""

from __future__ import annotations

import json
from typing import Any

from fovea.common.sampling import Grammar
from fovea.server.request_build import APIError

# OpenAI's json_object: any JSON object.
JSON_OBJECT = Grammar("json_schema", '{"type": "object"}')
RESPONSE_FORMATS = ("text", "json_object", "json_schema", "structural_tag")


def response_format_grammar(fmt: dict[str, Any] | None) -> Grammar | None:
    """The grammar `response_format` asks for (None: text); APIError 400 if malformed."""
    if fmt is None:
        return None
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return JSON_OBJECT
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise APIError(
                400,
                "response_format.json_schema must be an object with the schema under 'schema'",
                "response_format",
            )
        schema = spec.get("schema")
        if not isinstance(schema, dict | bool):
            raise APIError(
                400,
                "response_format.json_schema.schema must be a JSON schema (an object)",
                "response_format",
            )
        return Grammar("json_schema", json.dumps(schema))
    if kind == "structural_tag":
        return Grammar("structural_tag", json.dumps(fmt))
    served = ", ".join(RESPONSE_FORMATS)
    raise APIError(
        400,
        f"unsupported parameter: response_format.type={kind!r} (Fovea serves {served})",
        "response_format",
    )


def schema_text(value: str | dict[str, Any] | bool) -> str:
    """SGLang's `json_schema`: JSON text as given, or a schema object sent as one."""
    return value if isinstance(value, str) else json.dumps(value)


def one_grammar(candidates: dict[str, Grammar | None]) -> Grammar | None:
    """The one grammar among the request fields that gave one (field name -> grammar or None);
    APIError 400 naming them when more than one did."""
    given = [(name, g) for name, g in candidates.items() if g is not None]
    if len(given) > 1:
        names = " and ".join(name for name, _ in given[:2])
        raise APIError(
            400,
            f"at most one output constraint per request: got {names}",
            given[1][0],
        )
    return given[0][1] if given else None


def request_grammar(
    response_format: dict[str, Any] | None,
    regex: str | None,
    ebnf: str | None,
    json_schema: str | dict[str, Any] | None,
) -> Grammar | None:
    """Chat's and completions' fields -> the request's grammar (or None)."""
    return one_grammar(
        {
            "response_format": response_format_grammar(response_format),
            "regex": Grammar("regex", regex) if regex is not None else None,
            "ebnf": Grammar("ebnf", ebnf) if ebnf is not None else None,
            "json_schema": Grammar("json_schema", schema_text(json_schema))
            if json_schema is not None
            else None,
        }
    )


# /generate's sampling_params keys that give a grammar, and the kind each gives.
NATIVE_GRAMMAR_KEYS = {
    "json_schema": "json_schema",
    "regex": "regex",
    "ebnf": "ebnf",
    "structural_tag": "structural_tag",
}


def native_grammar(params: dict[str, Any]) -> Grammar | None:
    """The grammar among /generate's sampling_params (None: unconstrained); the grammar keys
    are SGLang's, each a string (a JSON schema may also be sent as an object)."""
    candidates: dict[str, Grammar | None] = {}
    for key, kind in NATIVE_GRAMMAR_KEYS.items():
        value = params.get(key)
        if value is None:
            candidates[key] = None
        elif isinstance(value, str) or (
            kind in ("json_schema", "structural_tag") and isinstance(value, dict | bool)
        ):
            candidates[key] = Grammar(kind, schema_text(value))
        else:
            raise APIError(400, f"sampling_params.{key} must be a string", f"sampling_params.{key}")
    return one_grammar(candidates)
