"""Parsing JSON that a model is still writing: the value so far, and how much of its canonical
text (`dumps`) is already final.

Contract, for a text that is a prefix of a valid JSON document: `parse_partial(text)` returns
`(value, unstable)` where `dumps(value)[: len(dumps(value)) - unstable]` is a prefix of
`dumps(final value)` (`final` the document once complete, duplicate keys aside), and that stable
text only grows as `text` does. So streaming it is never taken back. What makes this hold:
- an object member appears once its key is complete and its value has begun: a string value is
  shown as far as it goes (an escape cut short, or a lone high surrogate, is left out), an
  object or array as what it holds so far; numbers and true/false/null only once followed by a
  delimiter (a number cut short could still grow digits, "tr" is no value yet);
- the unstable tail is the closing quote of the open string plus one closer per open container,
  which are exactly the last characters of `dumps(value)` (no whitespace before closers).
"""

from __future__ import annotations

import json
import re
from typing import Any

_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")
_LITERALS = {"true": True, "false": False, "null": None}
_WS = " \t\n\r"


def dumps(value: Any) -> str:
    """The canonical JSON text of tool-call arguments (what the API returns as `arguments`)."""
    return json.dumps(value, ensure_ascii=False)


class _Incomplete(Exception):
    """The text ends before a value has begun (or inside a number or literal)."""


class PartialJSONError(ValueError):
    """The text is not the prefix of any JSON document."""


def parse_partial(text: str) -> tuple[Any, int]:
    """(value so far, unstable trailing characters of dumps(value)). Raises PartialJSONError
    for text that cannot start a JSON document, and when no value has begun yet."""
    parser = _Parser(text)
    try:
        value, unstable = parser.value()
    except _Incomplete:
        raise PartialJSONError("no value yet") from None
    return value, unstable


class _Parser:
    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0

    def _ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i] in _WS:
            self.i += 1

    def _at_end(self) -> bool:
        self._ws()
        return self.i >= len(self.s)

    def value(self) -> tuple[Any, int]:
        if self._at_end():
            raise _Incomplete
        c = self.s[self.i]
        if c == "{":
            return self._object()
        if c == "[":
            return self._array()
        if c == '"':
            return self._string()
        if c == "-" or c.isdigit():
            m = _NUMBER.match(self.s, self.i)
            if m is None or m.end() >= len(self.s):
                raise _Incomplete  # "-", or digits that may go on
            self.i = m.end()
            return json.loads(m.group()), 0
        for word, lit in _LITERALS.items():
            rest = self.s[self.i : self.i + len(word)]
            if rest == word:
                self.i += len(word)
                return lit, 0
            if word.startswith(rest) and self.i + len(rest) == len(self.s):
                raise _Incomplete
        raise PartialJSONError(f"unexpected {c!r} at {self.i}")

    def _string(self) -> tuple[str, int]:
        start = j = self.i + 1
        while j < len(self.s):
            c = self.s[j]
            if c == '"':
                self.i = j + 1
                return json.loads(self.s[start - 1 : j + 1], strict=False), 0
            if c == "\\":
                step = 6 if self.s[j + 1 : j + 2] == "u" else 2
                if j + step > len(self.s):
                    break  # an escape cut short: left out until it is whole
                j += step
            else:
                j += 1
        self.i = len(self.s)
        text: str = json.loads(f'"{self.s[start:j]}"', strict=False)
        if text and "\ud800" <= text[-1] <= "\udbff":
            text = text[:-1]  # half a surrogate pair: its other half changes what it dumps to
        return text, 1

    def _object(self) -> tuple[dict[str, Any], int]:
        out: dict[str, Any] = {}
        self.i += 1
        while True:
            if self._at_end():
                return out, 1
            if self.s[self.i] == "}":
                self.i += 1
                return out, 0
            if self.s[self.i] != '"':
                raise PartialJSONError(f"expected a key at {self.i}")
            key, open_key = self._string()
            if open_key or self._at_end():
                return out, 1
            if self.s[self.i] != ":":
                raise PartialJSONError(f"expected ':' at {self.i}")
            self.i += 1
            try:
                value, unstable = self.value()
            except _Incomplete:
                return out, 1
            out[key] = value
            if unstable:
                return out, unstable + 1
            if self._at_end():
                return out, 1
            if self.s[self.i] == ",":
                self.i += 1
            elif self.s[self.i] != "}":
                raise PartialJSONError(f"expected ',' or '}}' at {self.i}")

    def _array(self) -> tuple[list[Any], int]:
        out: list[Any] = []
        self.i += 1
        while True:
            if self._at_end():
                return out, 1
            if self.s[self.i] == "]":
                self.i += 1
                return out, 0
            try:
                value, unstable = self.value()
            except _Incomplete:
                return out, 1
            out.append(value)
            if unstable:
                return out, unstable + 1
            if self._at_end():
                return out, 1
            if self.s[self.i] == ",":
                self.i += 1
            elif self.s[self.i] != "]":
                raise PartialJSONError(f"expected ',' or ']' at {self.i}")
