"""Compiling an output Grammar (common/sampling.py) with xgrammar, shared by the tokenizer service
(validation) and the workers (masks).

Both build a compiler over the same tokenizer, vocabulary width (the logits') and stop tokens,
and compile with the same options, so a grammar the tokenizer service accepted compiles the same
on every rank.

xgrammar is imported lazily: a server that never sees a constrained request never loads it
(it imports torch and transformers, ~1-5 s). It is installed without its declared dependencies
(triton, ~1 GB, is only its GPU mask kernel): `XGRAMMAR_INSTALL`.

JSON schemas compile with `any_whitespace=False` and separators (", ", ": "): a model can then
never loop on whitespace between tokens (with any whitespace, small models emit newlines until
max_tokens), and strict mode (xgrammar's default): an object schema that lists `properties`
admits no others unless `additionalProperties` says so. For the same reason an integer without
a bound is held to the int64 range (`int64_bounded`; inside structural tags too): unbounded, a
small model greedily writes "1000..." until max_tokens (SmolLM2 on SGLang's own
structured-output test).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from types import ModuleType
from typing import TYPE_CHECKING, Any

from fovea.common.sampling import Grammar

if TYPE_CHECKING:
    import xgrammar

XGRAMMAR_INSTALL = "pip install --no-deps xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2"
JSON_SEPARATORS = (", ", ": ")
# What each kind is called in error messages.
KIND_NOUNS = {
    "json_schema": "JSON schema",
    "regex": "regex",
    "ebnf": "EBNF grammar",
    "structural_tag": "structural tag",
}
# xgrammar's C++ errors start "[hh:mm:ss] /path/file.cc:123: " and may add
# "Check failed: (...) is false: " before the message itself.
_CPP_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (?:Check failed: .*? is false: )?")


class GrammarError(ValueError):
    """A grammar that cannot be enforced; `message` says why (the client's 400)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class GrammarUnavailable(GrammarError):
    """xgrammar is not installed."""


_import_lock = threading.Lock()


def import_xgrammar() -> ModuleType:
    """The xgrammar module. Under a lock: a compile thread and the step loop may both ask
    first, and two threads importing transformers' lazy modules at once can see them half
    initialized ("cannot import name ... from transformers")."""
    with _import_lock:
        try:
            import xgrammar
        except ImportError as e:
            raise GrammarUnavailable(
                f"structured output needs the xgrammar package, which is not installed ({e}); "
                f"install it with: {XGRAMMAR_INSTALL}"
            ) from e
    return xgrammar


def make_compiler(
    hf_tokenizer: Any, vocab_size: int, stop_token_ids: list[int], threads: int
) -> xgrammar.GrammarCompiler:
    """A caching compiler (thread-safe; compiles release the GIL) for a model whose logits are
    `vocab_size` wide. `stop_token_ids`: every EOS id of the model; a grammar masks them until
    it is complete (empty: xgrammar takes the tokenizer's own)."""
    xgr = import_xgrammar()
    info = xgr.TokenizerInfo.from_huggingface(
        hf_tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids) or None
    )
    compiler: xgrammar.GrammarCompiler = xgr.GrammarCompiler(
        info, max_threads=threads, cache_enabled=True, cache_limit_bytes=256 << 20
    )
    return compiler


def compile_grammar(
    compiler: xgrammar.GrammarCompiler, grammar: Grammar
) -> xgrammar.CompiledGrammar:
    """Compile `grammar`; GrammarError (naming the kind and xgrammar's reason) if it is not
    valid. Cached by the compiler: the same (kind, spec) again costs microseconds."""
    noun = KIND_NOUNS.get(grammar.kind)
    if noun is None:
        raise GrammarError(f"unknown grammar kind {grammar.kind!r}")
    try:
        if grammar.kind == "json_schema":
            return compiler.compile_json_schema(
                int64_bounded(grammar.spec), any_whitespace=False, separators=JSON_SEPARATORS
            )
        if grammar.kind == "regex":
            return compiler.compile_regex(grammar.spec)
        if grammar.kind == "ebnf":
            return compiler.compile_grammar(grammar.spec)
        return _compile_structural_tag(compiler, grammar.spec)
    except (RuntimeError, ValueError, TypeError, KeyError) as e:
        raise GrammarError(f"invalid {noun}: {clean_error(e)}") from e


def _compile_structural_tag(
    compiler: xgrammar.GrammarCompiler, spec: str
) -> xgrammar.CompiledGrammar:
    """xgrammar's structural tag JSON (`{"type": "structural_tag", "format": ...}`), or SGLang's
    older response_format shape (`structures` of {begin, schema, end} and `triggers`)."""
    try:
        tag = json.loads(spec)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON: {e}") from e
    _bound_tag_schemas(tag)
    if isinstance(tag, dict) and "structures" in tag:
        xgr = import_xgrammar()
        items = [
            xgr.StructuralTagItem(
                begin=s["begin"], schema=json.dumps(s.get("schema", {})), end=s["end"]
            )
            for s in tag["structures"]
        ]
        return compiler.compile_structural_tag(items, list(tag.get("triggers", [])))
    return compiler.compile_structural_tag(json.dumps(tag))


def clean_error(e: BaseException) -> str:
    """xgrammar's message without the C++ file and line, first line only."""
    text = str(e).strip()
    lines = [_CPP_PREFIX.sub("", line).strip() for line in text.splitlines()]
    return next((line for line in lines if line), type(e).__name__)


# Keywords whose values are schemas: a map of them, a list of them, or one.
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_SCHEMA_ONE = (
    "items",
    "additionalProperties",
    "unevaluatedProperties",
    "unevaluatedItems",
    "propertyNames",
    "additionalItems",
    "not",
    "if",
    "then",
    "else",
    "contains",
)
_INT64 = 2**63


def subschemas(schema: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema object inside `schema`, itself first, depth first, with its dotted path
    (`properties.tags.items`; "" for the root). Enum and const values are data, not schemas."""
    if not isinstance(schema, dict):
        return
    yield path, schema
    prefix = f"{path}." if path else ""
    for key in _SCHEMA_MAPS:
        sub = schema.get(key)
        if isinstance(sub, dict):
            for name, value in sub.items():
                yield from subschemas(value, f"{prefix}{key}.{name}")
    for key in _SCHEMA_LISTS:
        sub = schema.get(key)
        if isinstance(sub, list):
            for i, value in enumerate(sub):
                yield from subschemas(value, f"{prefix}{key}.{i}")
    for key in _SCHEMA_ONE:
        yield from subschemas(schema.get(key), f"{prefix}{key}")


def int64_bounded(spec: str) -> str:
    """`spec` with every integer schema lacking a lower (upper) bound given -2**63 (2**63 - 1);
    `spec` itself when none lacks one or it is not JSON (xgrammar then says why)."""
    try:
        schema = json.loads(spec)
    except json.JSONDecodeError:
        return spec
    return json.dumps(schema) if _bound_integers(schema) else spec


def _bound_integers(schema: Any) -> bool:
    """int64_bounded in place; whether anything changed."""
    changed = False
    for _, sub in subschemas(schema):
        if sub.get("type") != "integer":
            continue
        if "minimum" not in sub and "exclusiveMinimum" not in sub:
            sub["minimum"], changed = -_INT64, True
        if "maximum" not in sub and "exclusiveMaximum" not in sub:
            sub["maximum"], changed = _INT64 - 1, True
    return changed


def _bound_tag_schemas(node: Any) -> None:
    """_bound_integers on every JSON schema inside a structural tag, in place: the `json_schema`
    of each `{"type": "json_schema", ...}` format, and each legacy structure's `schema`."""
    if isinstance(node, list):
        for item in node:
            _bound_tag_schemas(item)
    elif isinstance(node, dict):
        if node.get("type") == "json_schema" and isinstance(node.get("json_schema"), dict):
            _bound_integers(node["json_schema"])
        for key, value in node.items():
            if key == "schema" and isinstance(value, dict):
                _bound_integers(value)
            elif key != "json_schema":
                _bound_tag_schemas(value)
