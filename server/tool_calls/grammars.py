"""The output grammars that make tool calls happen, or keep them to their schemas.

- tool_choice "required" or a named tool: a JSON Schema of an array of calls, each
  `{"name": <one tool's name>, "parameters": <that tool's schema>}` (as SGLang and vLLM do); the
  output is then parsed as formats.JSON_ARRAY.
- tool_choice "auto" with a `strict: true` function: xgrammar's structural tag for the model's
  own format (free text until the format's trigger, then one of the tools' calls with its
  arguments checked against its schema; non-strict tools' arguments need only be an object).
  Its `begin`/`end` strings are built from formats.py's constants, so the grammar writes the
  bytes the parser reads; they equal xgrammar's own "qwen_3" (hermes) and "llama" (llama3)
  tags. The pythonic format has no tag: strict functions there are not enforced.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from fovea.common.sampling import Grammar
from fovea.server.request_build import APIError
from fovea.server.tool_calls import formats

# Per format: (trigger, call prefix up to the name, between name and arguments, call end).
_TAG_PARTS = {
    formats.HERMES: (
        formats.HERMES_BOT,
        formats.HERMES_CALL_PREFIX,
        formats.HERMES_ARGS_PREFIX,
        formats.HERMES_CALL_END,
    ),
    formats.LLAMA3: (
        formats.LLAMA3_CALL_PREFIX[:-1],  # '{"name": ': the name's quote is the tag's
        formats.LLAMA3_CALL_PREFIX,
        formats.LLAMA3_ARGS_PREFIX,
        formats.LLAMA3_CALL_END,
    ),
}
STRUCTURAL_TAG_FORMATS = tuple(_TAG_PARTS)
_ANY_OBJECT: dict[str, Any] = {"type": "object"}
# Definitions a tool's schema may carry, hoisted to the array schema's root so that its
# "#/$defs/..." references resolve there.
_DEF_KEYS = ("$defs", "definitions")


def _parameters(function: dict[str, Any]) -> dict[str, Any]:
    params = function.get("parameters")
    if not isinstance(params, dict):
        return dict(_ANY_OBJECT)
    out: dict[str, Any] = copy.deepcopy(params)
    return out


def calls_array_schema(tools: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """The JSON Schema of a non-empty array of calls to `tools` (at most one without parallel
    calls). APIError 400 when two tools define one $defs name differently."""
    defs: dict[str, dict[str, Any]] = {}
    items = []
    for tool in tools:
        function = tool["function"]
        params = _parameters(function)
        for key in _DEF_KEYS:
            for name, definition in (params.pop(key, None) or {}).items():
                if defs.setdefault(key, {}).setdefault(name, definition) != definition:
                    raise APIError(
                        400,
                        f"Tool definition '{name}' has multiple schemas, which is not supported.",
                        "tools",
                    )
        items.append(
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "enum": [function["name"]]},
                    "parameters": params,
                },
                "required": ["name", "parameters"],
            }
        )
    schema: dict[str, Any] = {
        "type": "array",
        "minItems": 1,
        "items": items[0] if len(items) == 1 else {"anyOf": items},
    }
    if not parallel:
        schema["maxItems"] = 1
    for key, found in defs.items():
        schema[key] = found
    return schema


def structural_tag(fmt: str, tools: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """xgrammar's structural tag for calls in the model's own format `fmt` (one of
    STRUCTURAL_TAG_FORMATS): strict functions' arguments follow their schemas."""
    trigger, prefix, between, end = _TAG_PARTS[fmt]
    tags = []
    for tool in tools:
        function = tool["function"]
        strict = function.get("strict") is True
        tags.append(
            {
                "type": "tag",
                # The name as it stands inside a JSON string.
                "begin": prefix + json.dumps(function["name"])[1:-1] + between,
                "content": {
                    "type": "json_schema",
                    "json_schema": _parameters(function) if strict else dict(_ANY_OBJECT),
                },
                "end": end,
            }
        )
    return {
        "type": "structural_tag",
        "format": {
            "type": "triggered_tags",
            "triggers": [trigger],
            "tags": tags,
            "at_least_one": False,
            "stop_after_first": not parallel,
        },
    }


def required_grammar(tools: list[dict[str, Any]], parallel: bool) -> Grammar:
    return Grammar("json_schema", json.dumps(calls_array_schema(tools, parallel)))


def strict_grammar(fmt: str, tools: list[dict[str, Any]], parallel: bool) -> Grammar | None:
    """The structural tag for "auto" when a function is strict and the format has a tag."""
    if fmt not in _TAG_PARTS or not any(t["function"].get("strict") is True for t in tools):
        return None
    return Grammar("structural_tag", json.dumps(structural_tag(fmt, tools, parallel)))
