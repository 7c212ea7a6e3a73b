"""Checking a request's output grammar (SamplingParams.grammar) before it runs: a bad one is a
400 naming the problem, never a failure in the workers.

Two checks. First, JSON schemas are read here: keywords xgrammar would silently not enforce are
refused by name (`unenforceable`), so an answer never claims a schema it does not satisfy.
Then the grammar is compiled (common/grammar_compiler.py) in a thread pool, never on the event
loop, bounded by --grammar-compile-timeout: other requests are served meanwhile, and a grammar
too costly to compile is a 400. xgrammar cannot cancel a compile: one that timed out finishes in
its thread (its result then sits in the compiler's cache). Building the compiler (importing
xgrammar and reading the vocabulary, ~1-5 s) happens once, on the first grammar, and is not
counted against the timeout.

The workers compile the same spec again (worker/grammar.py) with their own compiler: a compiled
grammar cannot be pickled, and its serialized form is larger than the spec (0.5 MB for a
10-property schema). This compile is a check only.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any

from fovea.common.grammar_compiler import (
    KIND_NOUNS,
    GrammarError,
    compile_grammar,
    make_compiler,
    subschemas,
)
from fovea.common.model_config import ModelInfo
from fovea.common.sampling import Grammar

if TYPE_CHECKING:
    import xgrammar

DEFAULT_TIMEOUT_S = 10.0
# The request field each kind comes from (the error's `param`).
GRAMMAR_PARAMS = {
    "json_schema": "response_format",
    "regex": "regex",
    "ebnf": "ebnf",
    "structural_tag": "response_format",
}
# JSON Schema keywords xgrammar 0.2.9 accepts but does not enforce (checked by compiling a
# schema with each and feeding it a violating instance: every one was accepted).
_REFUSED = (
    "not",
    "if",
    "then",
    "else",
    "dependentRequired",
    "dependentSchemas",
    "dependencies",
    "contains",
    "minContains",
    "maxContains",
)
# A lookahead or lookbehind group: xgrammar ignores it inside a schema's "pattern".
_LOOKAROUND = re.compile(r"(?<!\\)\(\?<?[=!]")


def unenforceable(schema: Any) -> str | None:
    """What in `schema` xgrammar would accept without enforcing it, with where it is
    (`'uniqueItems' at properties.tags`), or None."""
    for path, sub in subschemas(schema):
        where = path or "the root"
        for key in _REFUSED:
            if key in sub:
                return f"{key!r} at {where}"
        if sub.get("uniqueItems") is True:
            return f"'uniqueItems' at {where}"
        if isinstance(sub.get("allOf"), list) and len(sub["allOf"]) > 1:
            return f"'allOf' with more than one schema at {where}"
        if "multipleOf" in sub and sub.get("type") != "integer":
            return f"'multipleOf' on a non-integer at {where}"
        if ("pattern" in sub or "format" in sub) and ("minLength" in sub or "maxLength" in sub):
            return f"'minLength'/'maxLength' together with 'pattern' or 'format' at {where}"
        if isinstance(sub.get("pattern"), str) and _LOOKAROUND.search(sub["pattern"]):
            return f"a lookahead or lookbehind in 'pattern' at {where}"
    return None


def check_json_schema(spec: str) -> None:
    """GrammarError unless `spec` is JSON whose keywords can all be enforced."""
    try:
        schema = json.loads(spec)
    except json.JSONDecodeError as e:
        raise GrammarError(f"invalid JSON schema: not JSON: {e}") from e
    if not isinstance(schema, dict | bool):
        raise GrammarError(
            f"invalid JSON schema: a schema is a JSON object, got {type(schema).__name__}"
        )
    found = unenforceable(schema)
    if found is not None:
        raise GrammarError(
            f"JSON schema: {found} is not supported (structured output cannot enforce it)"
        )


class GrammarChecker:
    """Validates grammars for one model: the static checks above, then a bounded compile."""

    def __init__(
        self, hf_tokenizer: Any, model: ModelInfo, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> None:
        self.hf = hf_tokenizer
        self.model = model
        self.timeout_s = timeout_s
        # Compiles run here; xgrammar's own threads (2) parallelize inside one compile.
        self._pool = ThreadPoolExecutor(4, thread_name_prefix="grammar")
        self._compiler: Future[xgrammar.GrammarCompiler] | None = None
        self._lock = threading.Lock()

    def _compiler_future(self) -> Future[xgrammar.GrammarCompiler]:
        with self._lock:
            if self._compiler is None:
                vocab = self.model.vocab_size
                eos = list(self.model.eos_token_ids)
                self._compiler = self._pool.submit(make_compiler, self.hf, vocab, eos, 2)
            return self._compiler

    def _compile(self, grammar: Grammar) -> Future[Any]:
        compiler = self._compiler_future().result()
        return self._pool.submit(compile_grammar, compiler, grammar)

    def _timeout_error(self, grammar: Grammar) -> GrammarError:
        noun = KIND_NOUNS.get(grammar.kind, grammar.kind)
        return GrammarError(
            f"compiling the {noun} took longer than {self.timeout_s:g} s "
            "(--grammar-compile-timeout); simplify it"
        )

    async def check(self, grammar: Grammar) -> None:
        """GrammarError if `grammar` cannot be enforced or does not compile in time. The event
        loop keeps running meanwhile."""
        if grammar.kind == "json_schema":
            check_json_schema(grammar.spec)
        await asyncio.wrap_future(self._compiler_future())
        job = self._compile(grammar)
        try:
            await asyncio.wait_for(asyncio.wrap_future(job), self.timeout_s)
        except TimeoutError as e:
            raise self._timeout_error(grammar) from e

    def check_sync(self, grammar: Grammar) -> None:
        """`check` for a caller without an event loop (blocks the calling thread)."""
        if grammar.kind == "json_schema":
            check_json_schema(grammar.spec)
        job = self._compile(grammar)
        try:
            job.result(timeout=self.timeout_s)
        except FutureTimeout as e:
            raise self._timeout_error(grammar) from e
