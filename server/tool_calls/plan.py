"""A chat request's tools, checked, and what they mean for it: the tools the template renders,
the format its output is parsed in, and the grammar that enforces calls.

- "none" (or no tools): no tools rendered, the output is plain text, no grammar.
- "auto" (the default with tools): all rendered; the output is parsed in the model's own format
  (--tool-call-parser); a structural tag grammar when a function is strict (hermes, llama3).
- "required": all rendered; a grammar makes the output a JSON array of calls to any tools.
- {"type": "function", "function": {"name": N}}: the same, with calls to N only.

Tools are kept as the client sent them (key order included): templates render them with
`tojson`, so the prompt is the one transformers' apply_chat_template(tools=...) makes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from fovea.common.sampling import Grammar, SamplingParams
from fovea.server.request_build import APIError
from fovea.server.tool_calls import formats, grammars
from fovea.server.tool_calls.streaming import ToolCallParser

# --tool-call-parser's resolved value for a model whose template shows no format.
NO_FORMAT = "none"
_CHOICE_FORM = (
    "tool_choice must be 'none', 'auto', 'required' or "
    '{"type": "function", "function": {"name": ...}}'
)


@dataclass(frozen=True)
class ToolPlan:
    tools: list[dict[str, Any]] = field(default_factory=list)  # what the template renders
    fmt: str | None = None  # formats.*: how the output is parsed; None: plain text
    names: frozenset[str] = frozenset()  # the callable tools (others' calls are dropped)
    parallel: bool = True
    grammar: Grammar | None = None

    def parser(self) -> ToolCallParser | None:
        """A fresh parser of one choice's output; None when the output is plain text."""
        return None if self.fmt is None else ToolCallParser(self.fmt, self.names, self.parallel)


def check_tools(tools: list[Any]) -> None:
    """APIError 400 naming the first malformed tool: OpenAI's function tools only, each with a
    unique non-empty name and, if any, a valid JSON Schema as parameters."""
    from jsonschema import Draft202012Validator, SchemaError

    seen: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"tools.{i}"
        if not isinstance(tool, dict):
            raise APIError(400, f"{where} must be an object", where)
        if tool.get("type") != "function":
            raise APIError(400, f"{where}.type must be 'function', got {tool.get('type')!r}", where)
        function = tool.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(function, dict) or not isinstance(name, str) or not name:
            raise APIError(400, f"{where}.function.name is required: a non-empty string", where)
        if name in seen:
            raise APIError(400, f"{where}.function.name {name!r} is not unique", where)
        seen.add(name)
        if not isinstance(function.get("description", ""), str | None):
            raise APIError(400, f"{where}.function.description must be a string", where)
        if not isinstance(function.get("strict", False), bool | None):
            raise APIError(400, f"{where}.function.strict must be a boolean", where)
        params = function.get("parameters")
        if params is None:
            continue
        try:
            if not isinstance(params, dict):
                raise SchemaError("it must be a JSON Schema object")
            Draft202012Validator.check_schema(params)
        except SchemaError as e:
            raise APIError(
                400, f"{where}.function has an invalid 'parameters' schema: {e.message}", where
            ) from None


def _check_enforceable(tools: list[dict[str, Any]], enforced: set[str] | frozenset[str]) -> None:
    """APIError 400 naming the tool whose schema holds a keyword the grammar would accept
    without enforcing (the structured-output check, done here so the error names the tool)."""
    from fovea.tokenizer_service.grammar import unenforceable

    for i, tool in enumerate(tools):
        if tool["function"]["name"] not in enforced:
            continue
        found = unenforceable(tool["function"].get("parameters"))
        if found is not None:
            raise APIError(
                400,
                f"tools.{i}.function.parameters: {found} is not supported (tool calls cannot "
                "be held to it)",
                f"tools.{i}",
            )


def _named_choice(choice: Any) -> str | None:
    """The tool a {"type": "function", "function": {"name": ...}} choice names."""
    if not isinstance(choice, dict) or choice.get("type") != "function":
        return None
    function = choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    return name if isinstance(name, str) else None


def plan_tools(
    tools: list[Any] | None,
    tool_choice: Any,
    parallel_tool_calls: bool | None,
    model_format: str,
) -> ToolPlan:
    """The plan of one chat request (`model_format`: --tool-call-parser as resolved at
    launch, one of formats.MODEL_FORMATS or NO_FORMAT). APIError 400 for what cannot be
    served."""
    tools = tools or []
    check_tools(tools)
    parallel = parallel_tool_calls is not False
    named = _named_choice(tool_choice)
    if tool_choice is None:
        tool_choice = "auto" if tools else "none"
    if named is None and tool_choice not in ("none", "auto", "required"):
        raise APIError(400, f"{_CHOICE_FORM}, got {tool_choice!r}", "tool_choice")
    if tool_choice == "none" or (tool_choice == "auto" and not tools):
        return ToolPlan(parallel=parallel)
    if not tools:
        what = "'required'" if named is None else f"naming {named!r}"
        raise APIError(400, f"tool_choice {what} needs tools: none were given", "tool_choice")
    names = frozenset(t["function"]["name"] for t in tools)
    if named is not None:
        if named not in names:
            raise APIError(400, f"Tool '{named}' not found in tools list", "tool_choice")
        chosen = [t for t in tools if t["function"]["name"] == named]
        _check_enforceable(tools, {named})
        grammar = grammars.required_grammar(chosen, parallel)
        return ToolPlan(tools, formats.JSON_ARRAY, frozenset({named}), parallel, grammar)
    if tool_choice == "required":
        _check_enforceable(tools, names)
        grammar = grammars.required_grammar(tools, parallel)
        return ToolPlan(tools, formats.JSON_ARRAY, names, parallel, grammar)
    if model_format not in formats.MODEL_FORMATS:
        raise APIError(
            400,
            "this model's chat template shows no tool-call format Fovea can parse: start the "
            f"server with --tool-call-parser ({', '.join(formats.MODEL_FORMATS)}), or send "
            "tool_choice 'required' or a named tool",
            "tools",
        )
    strict = grammars.strict_grammar(model_format, tools, parallel)
    if strict is not None:
        _check_enforceable(
            tools, {t["function"]["name"] for t in tools if t["function"].get("strict")}
        )
    return ToolPlan(tools, model_format, names, parallel, strict)


def constrain(sampling: SamplingParams, plan: ToolPlan, skip_special_given: bool) -> SamplingParams:
    """`sampling` with the plan's grammar. A model format's markers may be special tokens
    (<|python_tag|>): they are kept in the text for the parser unless the client set
    skip_special_tokens itself (vLLM does the same)."""
    changes: dict[str, Any] = {}
    if plan.grammar is not None:
        if sampling.grammar is not None:
            raise APIError(
                400,
                "tool_choice and response_format cannot both constrain the output: send "
                "tool_choice 'auto' or 'none' (without strict functions) with a response_format",
                "tool_choice",
            )
        changes["grammar"] = plan.grammar
    if plan.fmt in formats.MODEL_FORMATS and not skip_special_given:
        changes["skip_special_tokens"] = False
    return msgspec.structs.replace(sampling, **changes) if changes else sampling


def history_tool_calls(calls: list[Any], where: str) -> list[dict[str, Any]]:
    """An assistant message's tool_calls as templates read them: each function's arguments
    (a JSON string in the API) decoded, as transformers' chat-template docs ask (Qwen2.5's
    template writes `tool_call.arguments | tojson`). APIError 400 for malformed calls."""
    import json

    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise APIError(
                400, f"{where}.{j} must be {{'type': 'function', 'function': {{'name', "
                "'arguments'}}}", f"{where}.{j}"
            )  # fmt: skip
        args = function.get("arguments")
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError as e:
                raise APIError(
                    400, f"{where}.{j}.function.arguments is not valid JSON: {e}",
                    f"{where}.{j}.function.arguments",
                ) from None  # fmt: skip
        out.append({**call, "function": {**function, "arguments": args}})
    return out
