"""The tool-call formats models write, as data: their markers, how a chat template reveals which
one a model uses, and the pure parsers of one call (a JSON object, a pythonic call list).

- hermes (Qwen2.5, Hermes, Qwen3): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`
  blocks after optional text.
- llama3 (Llama 3.1-3.3 JSON): text, then `<|python_tag|>` (or the output opens with `{`), then
  `{"name": ..., "parameters": {...}}` objects separated by `;`.
- pythonic (Llama 3.2/4 pythonic templates): `[f(a=1, b="x"), g()]`, possibly inside
  `<|python_start|>` ... `<|python_end|>`; arguments must be Python literals.
- json_array: not a model's own format but what tool_choice "required" or a named tool makes
  the model write under a grammar: `[{"name": ..., "parameters": {...}}, ...]`.

Every JSON format takes "arguments" or "parameters" for the arguments; a call naming no tool of
the request is dropped.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any

HERMES, LLAMA3, PYTHONIC, JSON_ARRAY = "hermes", "llama3", "pythonic", "json_array"
# The formats --tool-call-parser names (json_array is chosen per request, never by the model).
MODEL_FORMATS = (HERMES, LLAMA3, PYTHONIC)

HERMES_BOT, HERMES_EOT = "<tool_call>", "</tool_call>"
LLAMA3_BOT = "<|python_tag|>"
PYTHONIC_MARKERS = ("<|python_start|>", "<|python_end|>")
# The prefix of every call each JSON format writes, up to the function's name (the structural
# tag's `begin` strings are built from these, so grammar and parser agree on the bytes).
HERMES_CALL_PREFIX = HERMES_BOT + '\n{"name": "'
HERMES_ARGS_PREFIX = '", "arguments": '
HERMES_CALL_END = "}\n" + HERMES_EOT
LLAMA3_CALL_PREFIX = '{"name": "'
LLAMA3_ARGS_PREFIX = '", "parameters": '
LLAMA3_CALL_END = "}"

# What a template says when it teaches the pythonic form (Llama 3.2's and Llama 4's templates).
_PYTHONIC_HINTS = ("[func_name1(params_name1=params_value1", "<|python_start|>")


def detect_format(template: str | None) -> str | None:
    """The tool-call format a chat template's text teaches its model, or None. Pythonic first:
    Llama 4 templates also name the ipython role that marks the llama3 JSON form."""
    if not template:
        return None
    if HERMES_BOT in template:
        return HERMES
    if any(hint in template for hint in _PYTHONIC_HINTS):
        return PYTHONIC
    if LLAMA3_BOT in template or "ipython" in template:
        return LLAMA3
    return None


def arguments_key(obj: dict[str, Any]) -> str | None:
    """Which key of a call object holds its arguments ("arguments" before "parameters")."""
    for key in ("arguments", "parameters"):
        if key in obj:
            return key
    return None


def call_of(obj: Any) -> tuple[str, Any] | None:
    """(name, arguments) of a complete call object, or None when it is none (no string
    "name"). Missing or null arguments are an empty object."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    key = arguments_key(obj)
    args = obj[key] if key is not None else None
    return obj["name"], ({} if args is None else args)


# A "[" that may still open a pythonic call list: "[", then a name, then "(" and anything.
_PYTHONIC_START = re.compile(r"\[\s*(?:[A-Za-z_][\w.]*\s*(?:\(.*)?)?\Z", re.DOTALL)


def may_open_pythonic(text: str) -> bool:
    """Whether `text` (starting at a "[") can still grow into a pythonic call list."""
    return _PYTHONIC_START.match(text) is not None


def closing_bracket(text: str) -> int:
    """The index of the "]" that closes the "[" at text[0], skipping brackets inside Python
    string literals; -1 while it is not there yet."""
    depth, quote, i = 0, "", 0
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = ""
        elif c in "'\"":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0:
                return i if c == "]" else -1
        i += 1
    return -1


def parse_pythonic(text: str, names: frozenset[str]) -> list[tuple[str, dict[str, Any]]] | None:
    """The calls of a whole pythonic list `[f(a=1), g()]` (calls to unknown names dropped), or
    None when it is not a list of calls with literal keyword arguments."""
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except (SyntaxError, ValueError):
        return None
    if not isinstance(tree, ast.List):
        return None
    calls: list[tuple[str, dict[str, Any]]] = []
    for node in tree.elts:
        if not isinstance(node, ast.Call) or node.args:
            return None
        name = _dotted(node.func)
        if name is None:
            return None
        try:
            args = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg}
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return None
        if len(args) != len(node.keywords) or not _json_able(args):
            return None  # **kwargs, or a literal JSON has no form of (a set, bytes)
        if name in names:
            calls.append((name, args))
    return calls


def _json_able(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _dotted(node: ast.expr) -> str | None:
    """`f` or `a.b.f` as a name (Llama's built-in tools are dotted: brave_search.call)."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return None if head is None else f"{head}.{node.attr}"
    return None
