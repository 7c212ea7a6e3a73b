"""Turning TextDeltas into OpenAI (and SGLang-native) response bodies and SSE streams."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import msgspec
from fastapi.responses import Response

from fovea.common.config import ServerArgs
from fovea.common.messages import TextDelta, TextLogprob
from fovea.common.model_config import ModelInfo
from fovea.common.sampling import SamplingParams
from fovea.server.requests import RequestFailed
from fovea.server.tool_calls.plan import ToolPlan
from fovea.server.tool_calls.streaming import ToolCallParser, parse_complete

VERSION = "0.1.0"
_json = msgspec.json.Encoder()
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    503: "service_unavailable",
}


def json(body: Any, status: int = 200) -> Response:
    return Response(_json.encode(body), status_code=status, media_type="application/json")


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    kind = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {
        "error": {"message": message, "type": kind, "param": param, "code": code or str(status)}
    }


def error(status: int, message: str, param: str | None = None, code: str | None = None) -> Response:
    return json(error_body(status, message, param, code), status)


def describe_validation(errors: Sequence[Any]) -> tuple[str, str | None]:
    """pydantic errors -> (one readable message, the offending parameter)."""
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "not JSON")
        where = f" at position {loc[0]}" if loc else ""
        return f"invalid JSON in the request body{where}: {reason}", None
    if first.get("type") == "missing" and not loc:
        return "the request body is empty: a JSON object is needed", None
    param = ".".join(loc) or None
    msgs = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
        for e in errors[:5]
    )
    return msgs or "invalid request", param


class _Choice:
    __slots__ = ("finish", "logprobs", "matched", "prompt_logprobs", "text", "tokens")

    def __init__(self) -> None:
        self.prompt_logprobs: list[TextLogprob] | None = None
        self.text: list[str] = []
        self.tokens: list[int] = []
        self.logprobs: list[TextLogprob] = []
        self.finish: str | None = None
        self.matched: int | str | None = None


# Characters valid raw inside a JSON string that line splitters (Python's str.splitlines, used
# by httpx and so by the openai client) take for line breaks: escaped, so an SSE data line is
# never cut in two by a model that emits one. (JSON structure is ASCII: these UTF-8 sequences
# can only occur inside strings, where the escape means the same character.)
_LINE_BREAKS = (
    (b"\xc2\x85", b"\\u0085"),
    (b"\xe2\x80\xa8", b"\\u2028"),
    (b"\xe2\x80\xa9", b"\\u2029"),
)


def sse_event(obj: Any) -> bytes:
    data = _json.encode(obj)
    for raw, escaped in _LINE_BREAKS:
        if raw in data:
            data = data.replace(raw, escaped)
    return b"data: " + data + b"\n\n"


class Renderer:
    """Collects or streams one request's deltas. Subclasses format the bodies.

    A request may hold several prompts (merged by request_build.merge_streams): choice index
    = prompt * n + sample, and the usage sums the prompts'."""

    chunk_object = ""  # the OpenAI "object" of this endpoint's stream chunks

    def __init__(
        self,
        rid: str,
        model: str,
        sampling: SamplingParams,
        include_usage: bool,
        *,
        n_prompts: int = 1,
        continuous_usage: bool = False,
    ) -> None:
        self.rid, self.model, self.sampling = rid, model, sampling
        self.include_usage, self.continuous_usage = include_usage, continuous_usage
        self.n_prompts = n_prompts
        self.created = int(time.time())
        self.prompt: dict[int, int] = {}  # prompt number -> its tokens
        self.cached: dict[int, int] = {}
        self.completion: dict[int, int] = {}  # choice index -> its tokens so far

    def _account(self, d: TextDelta) -> None:
        p = d.index // self.sampling.n
        self.prompt[p] = d.prompt_tokens
        self.cached[p] = max(self.cached.get(p, 0), d.cached_tokens)
        self.completion[d.index] = d.completion_tokens

    def usage(self) -> dict[str, Any]:
        prompt, done = sum(self.prompt.values()), sum(self.completion.values())
        return {
            "prompt_tokens": prompt,
            "completion_tokens": done,
            "total_tokens": prompt + done,
            "prompt_tokens_details": {"cached_tokens": sum(self.cached.values())},
        }

    async def collect(self, deltas: AsyncIterator[TextDelta]) -> Any:
        choices = [_Choice() for _ in range(self.sampling.n * self.n_prompts)]
        async for d in deltas:
            self._account(d)
            c = choices[d.index]
            if d.prompt_logprobs is not None:
                c.prompt_logprobs = d.prompt_logprobs
            c.text.append(d.text)
            c.tokens.extend(d.token_ids)
            if d.logprobs:
                c.logprobs.extend(d.logprobs)
            if d.finish_reason is not None:
                c.finish, c.matched = d.finish_reason, d.matched_stop
        return self.body(choices)

    async def stream(self, deltas: AsyncIterator[TextDelta]) -> AsyncIterator[bytes]:
        try:
            async for d in deltas:
                self._account(d)
                for chunk in self.chunks(d):
                    if self.continuous_usage:
                        chunk["usage"] = self.usage()
                    yield sse_event(chunk)
            if self.include_usage:
                yield sse_event(self.usage_chunk())
        except RequestFailed as e:
            yield sse_event(error_body(e.status, e.message, e.param))
        yield b"data: [DONE]\n\n"

    def envelope(self, obj: str, **rest: Any) -> dict[str, Any]:
        """The fields every OpenAI body and chunk starts with."""
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model, **rest}

    def body(self, choices: list[_Choice]) -> Any:
        raise NotImplementedError

    def chunks(self, d: TextDelta) -> list[dict[str, Any]]:
        raise NotImplementedError

    def usage_chunk(self) -> dict[str, Any]:
        """The last SSE chunk when stream_options.include_usage: no choices, only usage."""
        return self.envelope(self.chunk_object, choices=[], usage=self.usage())


def _chat_logprobs(lps: list[TextLogprob]) -> dict[str, Any]:
    def entry(token: str, lp: float) -> dict[str, Any]:
        return {"token": token, "logprob": lp, "bytes": list(token.encode("utf-8"))}

    return {
        "content": [
            {
                **entry(x.token, x.logprob),
                "top_logprobs": [entry(t.token, t.logprob) for t in x.top],
            }
            for x in lps
        ]
    }


def _finish_reason(reason: str | None, called: bool) -> str | None:
    # A choice that called tools and then stopped by itself is waiting for their results.
    return "tool_calls" if called and reason == "stop" else reason


class ChatRenderer(Renderer):
    """Chat answers. With `tools` whose plan parses the output (tool_choice other than
    "none"), each choice's text is split into content and tool calls
    (server/tool_calls/streaming.py); a message with calls has content null when the model
    wrote no text beside them, as OpenAI's has."""

    chunk_object = "chat.completion.chunk"

    def __init__(self, *a: Any, tools: ToolPlan | None = None, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self._started: set[int] = set()
        self.tools = tools or ToolPlan()
        self._parsers: dict[int, ToolCallParser | None] = {}  # choice index -> its parser

    def _message(self, c: _Choice) -> tuple[dict[str, Any], str | None]:
        text = "".join(c.text)
        message: dict[str, Any] = {"role": "assistant", "content": text, "reasoning_content": None}
        parser = self.tools.parser()
        if parser is None:
            return {**message, "tool_calls": None}, c.finish
        content, calls = parse_complete(parser, text)
        message.update(content=content or (None if calls else ""), tool_calls=calls or None)
        return message, _finish_reason(c.finish, bool(calls))

    def body(self, choices: list[_Choice]) -> dict[str, Any]:
        out = []
        for i, c in enumerate(choices):
            message, finish = self._message(c)
            out.append(
                {
                    "index": i,
                    "message": message,
                    "logprobs": _chat_logprobs(c.logprobs) if self.sampling.logprobs else None,
                    "finish_reason": finish,
                    "matched_stop": c.matched,
                }
            )
        return self.envelope("chat.completion", choices=out, usage=self.usage())

    def _chunk(self, index: int, delta: dict[str, Any], **extra: Any) -> dict[str, Any]:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": None, **extra}
        return self.envelope("chat.completion.chunk", choices=[choice])

    def chunks(self, d: TextDelta) -> list[dict[str, Any]]:
        out = []
        if d.index not in self._started:
            self._started.add(d.index)
            first = {"role": "assistant", "content": "", "reasoning_content": None}
            out.append(self._chunk(d.index, first))
        text, finish = d.text, d.finish_reason
        calls: list[dict[str, Any]] = []
        if d.index not in self._parsers:
            self._parsers[d.index] = self.tools.parser()
        parser = self._parsers[d.index]
        if parser is not None:
            text, calls = parser.feed(d.text, final=finish is not None)
            finish = _finish_reason(finish, parser.calls > 0)
        if text or d.logprobs:
            lp = _chat_logprobs(d.logprobs) if d.logprobs and self.sampling.logprobs else None
            delta = {"content": text, "reasoning_content": None}
            out.append(self._chunk(d.index, delta, logprobs=lp))
        if calls:
            out.append(self._chunk(d.index, {"tool_calls": calls, "reasoning_content": None}))
        if finish is not None:
            out.append(
                self._chunk(
                    d.index,
                    {"reasoning_content": None},
                    finish_reason=finish,
                    matched_stop=d.matched_stop,
                )
            )
        return out


def _completion_logprobs(lps: Sequence[TextLogprob], start: int = 0) -> dict[str, Any]:
    """OpenAI's legacy shape. A prompt's first token (echo) has no logprob: nan -> null."""
    offsets, pos = [], start
    for x in lps:
        offsets.append(pos)
        pos += len(x.token)
    known = [x.logprob == x.logprob for x in lps]  # nan != nan
    return {
        "tokens": [x.token for x in lps],
        "token_logprobs": [x.logprob if k else None for x, k in zip(lps, known, strict=True)],
        "top_logprobs": [
            {t.token: t.logprob for t in x.top} if k else None
            for x, k in zip(lps, known, strict=True)
        ],
        "text_offset": offsets,
    }


class CompletionRenderer(Renderer):
    """Legacy completions. With `echo`, each choice starts with its prompt: `prompts[p]`, or
    for a prompt given as token ids the prompt tokens' texts (from the prompt logprobs)."""

    chunk_object = "text_completion"

    def __init__(self, *a: Any, echo: list[str | None] | None = None, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.echo = echo
        self._echoed: set[int] = set()

    def _prompt_part(self, index: int, lps: list[TextLogprob] | None) -> str:
        if self.echo is None:
            return ""
        text = self.echo[index // self.sampling.n]
        if text is None:
            text = "".join(x.token for x in lps or [])
        return text

    def body(self, choices: list[_Choice]) -> dict[str, Any]:
        out = []
        for i, c in enumerate(choices):
            prompt = self._prompt_part(i, c.prompt_logprobs)
            lp = None
            if self.sampling.logprobs:
                lps = [*(c.prompt_logprobs or []), *c.logprobs] if self.echo else c.logprobs
                lp = _completion_logprobs(lps)
            choice = {"index": i, "text": prompt + "".join(c.text), "logprobs": lp}
            out.append({**choice, "finish_reason": c.finish, "matched_stop": c.matched})
        return self.envelope("text_completion", choices=out, usage=self.usage())

    def chunks(self, d: TextDelta) -> list[dict[str, Any]]:
        text, lps = d.text, list(d.logprobs or [])
        if self.echo is not None and d.index not in self._echoed:
            self._echoed.add(d.index)
            text = self._prompt_part(d.index, d.prompt_logprobs) + text
            lps = [*(d.prompt_logprobs or []), *lps]
        if not text and d.finish_reason is None and not lps:
            return []
        choice = {
            "index": d.index,
            "text": text,
            "logprobs": _completion_logprobs(lps) if lps and self.sampling.logprobs else None,
            "finish_reason": d.finish_reason,
        }
        if d.finish_reason is not None:
            choice["matched_stop"] = d.matched_stop
        return [self.envelope("text_completion", choices=[choice])]


def model_card(args: ServerArgs, model: ModelInfo) -> dict[str, Any]:
    return {
        "id": args.model_name,
        "object": "model",
        "created": int(time.time()),
        "owned_by": "fovea",
        "root": args.model_path,
        "max_model_len": model.context_length,
    }


def model_list(args: ServerArgs, model: ModelInfo) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(args, model)]}


def model_info(args: ServerArgs, model: ModelInfo) -> dict[str, Any]:
    return {
        "model_path": args.model_path,
        "tokenizer_path": args.tokenizer_path or args.model_path,
        "served_model_name": args.model_name,
        "is_generation": True,
        "model_type": model.model_type,
        "architecture": model.architecture,
        "architectures": [model.architecture],  # SGLang's name (its router labels workers by it)
        "context_length": model.context_length,
    }


def public_args(args: ServerArgs) -> dict[str, Any]:
    out = msgspec.to_builtins(args)
    if out.get("api_key"):
        out["api_key"] = "***"
    return out  # type: ignore[no-any-return]
