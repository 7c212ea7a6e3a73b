"""One choice's output text, as it streams, split into content and tool calls (OpenAI deltas).

`ToolCallParser(fmt, names)`: `feed(text)` per detokenized delta, `final=True` on the last one
(or `finish()`); each returns a `Parsed` (content text to send, tool-call delta entries). A
complete answer is the same machine fed once (`parse_complete`), so streamed and whole answers
agree by construction. Invariants:
- markup never reaches content: text that ends with a proper prefix of a marker is held back
  until it either completes the marker or cannot any more; whitespace right before a call is
  dropped with it (content is the text before the first call, less its trailing whitespace);
- hermes: once a call began, text outside `<tool_call>` blocks is dropped (it is markup glue);
- a call's first entry is `{"index", "id", "type": "function", "function": {"name", "arguments"}}`
  sent once its name is complete and names a tool of the request (unknown names are dropped
  without taking an index), with arguments "" while the call is still open; later entries carry
  `{"index", "function": {"arguments"}}`, the next piece of the stable prefix of the arguments'
  JSON (partial_json.py), and once the call is whole the rest, so the pieces join into
  `dumps(arguments)`; entries of one index within one feed merge;
- llama3 and json_array: output that looked like calls but gave none is sent as content at the
  end (it was JSON text, not markup); pythonic: a "[" that stops looking like a call list, or a
  list that gives no call, is content;
- with parallel calls off, only the first call is sent.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, NamedTuple

from fovea.server.tool_calls import formats
from fovea.server.tool_calls.partial_json import dumps, parse_partial


class Parsed(NamedTuple):
    content: str
    tool_calls: list[dict[str, Any]]


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class _Out:
    """What one feed produced; allocates call indexes for the whole choice."""

    def __init__(self, machine: ToolCallParser) -> None:
        self.machine = machine
        self.content: list[str] = []
        self.entries: list[dict[str, Any]] = []

    def text(self, text: str) -> None:
        if text:
            self.content.append(text)

    def start(self, name: str) -> int | None:
        """A new call's index and its first entry; None when no further call may be sent."""
        m = self.machine
        if m.calls and not m.parallel:
            return None
        index = m.calls
        m.calls += 1
        function = {"name": name, "arguments": ""}
        entry = {"index": index, "id": new_call_id(), "type": "function", "function": function}
        self.entries.append(entry)
        return index

    def arguments(self, index: int, piece: str) -> None:
        if not piece:
            return
        for entry in reversed(self.entries):
            if entry["index"] == index:
                entry["function"]["arguments"] += piece
                return
        self.entries.append({"index": index, "function": {"arguments": piece}})

    def parsed(self) -> Parsed:
        return Parsed("".join(self.content), self.entries)


class _Call:
    """One JSON call object, seen grow (`partial`) and then whole (`complete`)."""

    def __init__(self, names: frozenset[str]) -> None:
        self.names = names
        self.index: int | None = None
        self.dropped = False  # an unknown name, or a call past the first without parallel calls
        self.sent = ""  # the arguments' JSON sent so far

    def _start(self, out: _Out, name: str) -> bool:
        if self.index is None and not self.dropped:
            self.index = out.start(name) if name in self.names else None
            self.dropped = self.index is None
        return self.index is not None

    def _send(self, out: _Out, stable: str) -> None:
        assert self.index is not None
        if stable.startswith(self.sent):
            out.arguments(self.index, stable[len(self.sent) :])
            self.sent = stable

    def partial(self, out: _Out, text: str) -> None:
        try:
            obj, unstable = parse_partial(text)
        except ValueError:
            return
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return
        last = list(obj)[-1]
        if last == "name" and unstable > 1:
            return  # the name's closing quote has not come: it may grow
        started = self.index is not None
        if not self._start(out, obj["name"]) or not started:
            return  # a call's first entry carries its name alone (arguments "")
        key = formats.arguments_key(obj)
        if key is None:
            return
        args = dumps(obj[key])
        # The object's own closer is the last unstable character; the rest are the arguments'.
        args_unstable = max(unstable - 1, 0) if last == key else 0
        self._send(out, args[: len(args) - args_unstable])

    def complete(self, out: _Out, obj: Any) -> None:
        call = formats.call_of(obj)
        if call is not None and self._start(out, call[0]):
            self._send(out, dumps(call[1]))

    @property
    def sent_any(self) -> bool:
        return self.index is not None


def _hold(text: str, markers: tuple[str, ...]) -> int:
    """Characters at the end of `text` to hold back: the longest suffix that is a proper prefix
    of a marker, and the whitespace before it (dropped if a call follows)."""
    hold = 0
    for marker in markers:
        for k in range(min(len(marker) - 1, len(text)), hold, -1):
            if text.endswith(marker[:k]):
                hold = k
                break
    body = text[: len(text) - hold]
    return len(text) - len(body.rstrip())


class ToolCallParser:
    """One choice's parser for one format (formats.HERMES, LLAMA3, PYTHONIC or JSON_ARRAY)."""

    def __init__(self, fmt: str, names: frozenset[str], parallel: bool = True) -> None:
        if fmt not in (*formats.MODEL_FORMATS, formats.JSON_ARRAY):
            raise ValueError(f"unknown tool-call format {fmt!r}")
        self.fmt, self.names, self.parallel = fmt, names, parallel
        self.calls = 0  # indexes handed out
        self.buf = ""  # text not yet settled
        # hermes: "text" | "call" | "after"; llama3: "start" | "text" | "calls";
        # json_array: "start" | "calls"; pythonic: "text" | "list".
        self.state = "start" if fmt in (formats.LLAMA3, formats.JSON_ARRAY) else "text"
        self.call: _Call | None = None
        self.region = ""  # llama3 / json_array: the call text since the first object
        self.pos = 0  # ... and where the current object starts in it
        self._step = {
            formats.HERMES: self._feed_hermes,
            formats.LLAMA3: self._feed_llama3,
            formats.PYTHONIC: self._feed_pythonic,
            formats.JSON_ARRAY: self._feed_json_array,
        }[fmt]

    def feed(self, text: str, final: bool = False) -> Parsed:
        """What `text` settles; with `final` (the output ended) everything left, too."""
        out = _Out(self)
        self.buf += text
        self._step(out, final)
        return out.parsed()

    def finish(self) -> Parsed:
        return self.feed("", final=True)

    # ------------------------------------------------------------ hermes

    def _feed_hermes(self, out: _Out, final: bool) -> None:
        while True:
            if self.state in ("text", "after"):
                i = self.buf.find(formats.HERMES_BOT)
                if i < 0:
                    hold = 0 if final else _hold(self.buf, (formats.HERMES_BOT,))
                    if self.state == "text":
                        out.text(self.buf[: len(self.buf) - hold])
                    self.buf = self.buf[len(self.buf) - hold :]
                    return
                if self.state == "text":
                    out.text(self.buf[:i].rstrip())
                self.buf = self.buf[i + len(formats.HERMES_BOT) :]
                self.state, self.call = "call", _Call(self.names)
            assert self.call is not None
            j = self.buf.find(formats.HERMES_EOT)
            if j < 0:
                if final:  # a block the output ended in: a call if its JSON is whole
                    self.call.complete(out, _loads(self.buf))
                else:
                    self.call.partial(out, self.buf.lstrip())
                return
            self.call.complete(out, _loads(self.buf[:j]))
            self.buf = self.buf[j + len(formats.HERMES_EOT) :]
            self.state = "after"

    # ------------------------------------------------------------ llama3, json_array

    def _feed_llama3(self, out: _Out, final: bool) -> None:
        if self.state == "start":
            if not self.buf.strip() and not final:
                return
            self.state = "calls" if self.buf.lstrip().startswith("{") else "text"
            if self.state == "calls":
                self.region, self.buf = self.buf, ""
        if self.state == "text":
            i = self.buf.find(formats.LLAMA3_BOT)
            if i < 0:
                hold = 0 if final else _hold(self.buf, (formats.LLAMA3_BOT,))
                out.text(self.buf[: len(self.buf) - hold])
                self.buf = self.buf[len(self.buf) - hold :]
                return
            out.text(self.buf[:i].rstrip())
            self.region, self.buf = self.buf[i + len(formats.LLAMA3_BOT) :], ""
            self.state = "calls"
        self.region += self.buf
        self.buf = ""
        self._objects(out, final, ";")

    def _feed_json_array(self, out: _Out, final: bool) -> None:
        self.region += self.buf
        self.buf = ""
        if self.state == "start":
            stripped = self.region.lstrip()
            if stripped[:1] == "[":
                self.state = "calls"
                self.pos = len(self.region) - len(stripped) + 1
            elif stripped or final:
                self.state = "done"  # not an array: all of it is content, at the end
        if self.state == "calls":
            self._objects(out, final, ",")
        if final and self.calls == 0:
            out.text(self.region)

    def _objects(self, out: _Out, final: bool, sep: str) -> None:
        """Call objects in self.region from self.pos on, separated by `sep` (and whitespace):
        whole ones are decoded, the last one is parsed as it grows. Anything else (the array's
        "]", text after the calls) ends them."""
        decoder = json.JSONDecoder(strict=False)
        while self.state == "calls":
            rest = self.region[self.pos :]
            skipped = len(rest) - len(rest.lstrip(" \t\r\n" + sep))
            self.pos += skipped
            rest = rest[skipped:]
            if not rest:
                break
            if rest[0] != "{":
                self.state = "done"
                break
            self.call = self.call or _Call(self.names)
            try:
                obj, end = decoder.raw_decode(rest)
            except ValueError:
                if final:
                    self.state = "done"
                else:
                    self.call.partial(out, rest)
                break
            self.call.complete(out, obj)
            self.call = None
            self.pos += end
        if final and self.fmt == formats.LLAMA3 and self.calls == 0:
            out.text(self.region)  # JSON that named no tool: the model's answer after all

    # ------------------------------------------------------------ pythonic

    def _feed_pythonic(self, out: _Out, final: bool) -> None:
        for marker in formats.PYTHONIC_MARKERS:
            self.buf = self.buf.replace(marker, "")
        while self.buf:
            i = self.buf.find("[")
            if i < 0:
                hold = 0 if final else _hold(self.buf, formats.PYTHONIC_MARKERS)
                out.text(self.buf[: len(self.buf) - hold])
                self.buf = self.buf[len(self.buf) - hold :]
                return
            candidate = self.buf[i:]
            end = formats.closing_bracket(candidate)
            if end < 0 and formats.may_open_pythonic(candidate) and not final:
                out.text(self.buf[:i].rstrip())
                self.buf = self.buf[len(self.buf[:i].rstrip()) :]
                return
            calls = None if end < 0 else formats.parse_pythonic(candidate[: end + 1], self.names)
            if not calls:  # "[" that is no call list (or names no tool): plain text
                out.text(self.buf[: i + 1])
                self.buf = self.buf[i + 1 :]
                continue
            out.text(self.buf[:i].rstrip())
            for name, args in calls:
                index = out.start(name)
                if index is not None:
                    out.arguments(index, dumps(args))
            self.buf = candidate[end + 1 :]


def _loads(text: str) -> Any:
    try:
        return json.loads(text, strict=False)
    except ValueError:
        return None


def parse_complete(parser: ToolCallParser, text: str) -> tuple[str, list[dict[str, Any]]]:
    """A whole output's content and tool calls (each {"id", "type", "function": {"name",
    "arguments"}}), by a fresh streaming machine fed once."""
    parsed = parser.feed(text, final=True)
    # One feed: one entry per call, in index order.
    calls = [{k: v for k, v in e.items() if k != "index"} for e in parsed.tool_calls]
    return parsed.content, calls
