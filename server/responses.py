"""Turning TextDeltas into OpenAI (and SGLang-native) response bodies and SSE streams."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import msgspec
from fastapi.responses import Response

from fovea.common.config import ServerArgs
from fovea.common.messages import GenerateRequest, ImageRef, TextDelta, TextLogprob
from fovea.common.model_config import ModelInfo
from fovea.common.sampling import SamplingParams
from fovea.server.requests import RequestFailed

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
        return "request body is not valid JSON", None
    param = ".".join(loc) or None
    msgs = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
        for e in errors[:5]
    )
    return msgs or "invalid request", param


def split_prompts(prompt: Any) -> list[str | list[int]]:
    """OpenAI's prompt forms -> a list of prompts, each text or token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if not prompt:
        return [""]
    return list(prompt)


def prompt_request(
    rid: str,
    prompt: str | list[int],
    sampling: SamplingParams,
    images: list[ImageRef] | None = None,
) -> GenerateRequest:
    text, ids = (prompt, None) if isinstance(prompt, str) else (None, prompt)
    return GenerateRequest(
        rid=rid,
        sampling=sampling,
        text=text,
        input_ids=ids,
        images=images or [],
        arrival_time=time.time(),
    )


def images_per_prompt(image_data: Any, n_prompts: int) -> list[list[ImageRef]]:
    """SGLang's `image_data` aligned with the prompts: for one prompt an image or a list of
    images; for several, a list with one entry (None, an image or a list) per prompt. An
    image is a URL / data URI / path string, or the file's bytes. ValueError if misshapen."""

    def refs(entry: Any) -> list[ImageRef]:
        items = entry if isinstance(entry, list) else [] if entry is None else [entry]
        out = []
        for item in items:
            if isinstance(item, str):
                out.append(ImageRef(url=item))
            elif isinstance(item, bytes | bytearray):
                out.append(ImageRef(data=bytes(item)))
            else:
                raise ValueError(
                    f"an image must be a URL, data URI, path or bytes, not {type(item).__name__}"
                )
        return out

    if image_data is None:
        return [[] for _ in range(n_prompts)]
    if n_prompts == 1:
        return [refs(image_data)]
    if not isinstance(image_data, list) or len(image_data) != n_prompts:
        raise ValueError(
            f"image_data must be a list with one entry for each of the {n_prompts} prompts"
        )
    return [refs(entry) for entry in image_data]


class _Choice:
    __slots__ = ("finish", "logprobs", "matched", "text", "tokens")

    def __init__(self) -> None:
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
    """Collects or streams one request's deltas. Subclasses format the bodies."""

    chunk_object = ""  # the OpenAI "object" of this endpoint's stream chunks

    def __init__(self, rid: str, model: str, sampling: SamplingParams, include_usage: bool) -> None:
        self.rid, self.model, self.sampling = rid, model, sampling
        self.include_usage = include_usage
        self.created = int(time.time())
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.completion: dict[int, int] = {}

    def _account(self, d: TextDelta) -> None:
        self.prompt_tokens = d.prompt_tokens
        self.cached_tokens = max(self.cached_tokens, d.cached_tokens)
        self.completion[d.index] = d.completion_tokens

    def usage(self) -> dict[str, Any]:
        done = sum(self.completion.values())
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": done,
            "total_tokens": self.prompt_tokens + done,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }

    async def collect(self, deltas: AsyncIterator[TextDelta]) -> Any:
        choices = [_Choice() for _ in range(self.sampling.n)]
        async for d in deltas:
            self._account(d)
            c = choices[d.index]
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


class ChatRenderer(Renderer):
    chunk_object = "chat.completion.chunk"

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self._started: set[int] = set()

    def body(self, choices: list[_Choice]) -> dict[str, Any]:
        return self.envelope(
            "chat.completion",
            choices=[
                {
                    "index": i,
                    "message": {"role": "assistant", "content": "".join(c.text)},
                    "logprobs": _chat_logprobs(c.logprobs) if self.sampling.logprobs else None,
                    "finish_reason": c.finish,
                    "matched_stop": c.matched,
                }
                for i, c in enumerate(choices)
            ],
            usage=self.usage(),
        )

    def _chunk(self, index: int, delta: dict[str, Any], **extra: Any) -> dict[str, Any]:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": None, **extra}
        return self.envelope(
            "chat.completion.chunk",
            choices=[choice],
        )

    def chunks(self, d: TextDelta) -> list[dict[str, Any]]:
        out = []
        if d.index not in self._started:
            self._started.add(d.index)
            out.append(self._chunk(d.index, {"role": "assistant", "content": ""}))
        if d.text or d.logprobs:
            lp = _chat_logprobs(d.logprobs) if d.logprobs and self.sampling.logprobs else None
            out.append(self._chunk(d.index, {"content": d.text}, logprobs=lp))
        if d.finish_reason is not None:
            out.append(
                self._chunk(d.index, {}, finish_reason=d.finish_reason, matched_stop=d.matched_stop)
            )
        return out


def _completion_logprobs(lps: list[TextLogprob], start: int = 0) -> dict[str, Any]:
    offsets, pos = [], start
    for x in lps:
        offsets.append(pos)
        pos += len(x.token)
    return {
        "tokens": [x.token for x in lps],
        "token_logprobs": [x.logprob for x in lps],
        "top_logprobs": [{t.token: t.logprob for t in x.top} for x in lps],
        "text_offset": offsets,
    }


class CompletionRenderer(Renderer):
    chunk_object = "text_completion"

    def body(self, choices: list[_Choice]) -> dict[str, Any]:
        return self.envelope(
            "text_completion",
            choices=[
                {
                    "index": i,
                    "text": "".join(c.text),
                    "logprobs": _completion_logprobs(c.logprobs)
                    if self.sampling.logprobs
                    else None,
                    "finish_reason": c.finish,
                    "matched_stop": c.matched,
                }
                for i, c in enumerate(choices)
            ],
            usage=self.usage(),
        )

    def chunks(self, d: TextDelta) -> list[dict[str, Any]]:
        if not d.text and d.finish_reason is None and not d.logprobs:
            return []
        lp = _completion_logprobs(d.logprobs) if d.logprobs and self.sampling.logprobs else None
        choice = {
            "index": d.index,
            "text": d.text,
            "logprobs": lp,
            "finish_reason": d.finish_reason,
        }
        if d.finish_reason is not None:
            choice["matched_stop"] = d.matched_stop
        return [
            self.envelope(
                "text_completion",
                choices=[choice],
            )
        ]


def merge_completions(rid: str, model: str, bodies: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """Several prompts in one /v1/completions request: choice index = prompt * n + sample."""
    choices = []
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    cached = 0
    for p, b in enumerate(bodies):
        for c in b["choices"]:
            choices.append({**c, "index": p * n + c["index"]})
        for k in usage:
            usage[k] += b["usage"][k]
        cached += b["usage"]["prompt_tokens_details"]["cached_tokens"]
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": {**usage, "prompt_tokens_details": {"cached_tokens": cached}},
    }


class NativeRenderer(Renderer):
    """SGLang's /generate: cumulative text; a list when n > 1."""

    def __init__(self, rid: str) -> None:
        super().__init__(rid, "", SamplingParams(), False)
        self._text: dict[int, str] = {}
        self._ids: dict[int, list[int]] = {}

    async def collect(self, deltas: AsyncIterator[TextDelta]) -> Any:
        outs: dict[int, dict[str, Any]] = {}
        async for d in deltas:
            outs[d.index] = self._accumulate(d)
        items = [outs[i] for i in sorted(outs)]
        return items[0] if len(items) == 1 else items

    def _accumulate(self, d: TextDelta) -> dict[str, Any]:
        text = self._text.get(d.index, "") + d.text
        ids = self._ids.setdefault(d.index, [])
        ids.extend(d.token_ids)
        self._text[d.index] = text
        reason: dict[str, Any] | None = None
        if d.finish_reason == "length":
            reason = {"type": "length", "length": d.completion_tokens}
        elif d.finish_reason is not None:
            reason = {"type": d.finish_reason, "matched": d.matched_stop}
        meta = {
            "id": f"{self.rid}" if d.index == 0 else f"{self.rid}#{d.index}",
            "finish_reason": reason,
            "prompt_tokens": d.prompt_tokens,
            "completion_tokens": d.completion_tokens,
            "cached_tokens": d.cached_tokens,
        }
        return {"text": text, "output_ids": list(ids), "index": d.index, "meta_info": meta}

    def chunks(self, d: TextDelta) -> list[dict[str, Any]]:
        return [self._accumulate(d)]


def model_list(args: ServerArgs, model: ModelInfo) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {
                "id": args.model_name,
                "object": "model",
                "created": int(time.time()),
                "owned_by": "fovea",
                "root": args.model_path,
                "max_model_len": model.context_length,
            }
        ],
    }


def model_info(args: ServerArgs, model: ModelInfo) -> dict[str, Any]:
    return {
        "model_path": args.model_path,
        "tokenizer_path": args.tokenizer_path or args.model_path,
        "served_model_name": args.model_name,
        "is_generation": True,
        "architecture": model.architecture,
        "context_length": model.context_length,
    }


def public_args(args: ServerArgs) -> dict[str, Any]:
    out = msgspec.to_builtins(args)
    if out.get("api_key"):
        out["api_key"] = "***"
    return out  # type: ignore[no-any-return]
