"""OpenAI request schemas (pydantic, validated by FastAPI) and their mapping to SamplingParams.

Responses are built as plain dicts in responses.py and encoded with msgspec: faster than pydantic
response models on the hot streaming path.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

import msgspec
from pydantic import BaseModel, ConfigDict, Field

from fovea.common.messages import ChatMessage
from fovea.common.sampling import (
    MAX_LOGIT_BIAS,
    MAX_LOGIT_BIAS_ENTRIES,
    MAX_N,
    MAX_STOP,
    MAX_STOP_CHARS,
    MAX_STOP_TOKEN_IDS,
    MAX_TOP_LOGPROBS,
    SamplingParams,
)
from fovea.server.structured_output import NATIVE_GRAMMAR_KEYS, native_grammar, request_grammar
from fovea.server.tool_calls.plan import history_tool_calls

# The sampling fields' bounds, for /openapi.json only (so clients and fuzzers reading it know
# them): validate_sampling enforces them, with messages naming the field, for every route and
# the offline Engine alike. Bounds that depend on the model (context length, vocabulary) are
# checked there too but cannot be stated here.
_STOP_STRING = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS}
_BOUNDS: dict[str, dict[str, Any]] = {
    "temperature": {"minimum": 0, "maximum": 100},
    "top_p": {"exclusiveMinimum": 0, "maximum": 1},
    "top_k": {"minimum": -1},
    "min_p": {"minimum": 0, "maximum": 1},
    "n": {"minimum": 1, "maximum": MAX_N},
    "seed": {"minimum": 0, "maximum": 2**63 - 1},
    "presence_penalty": {"minimum": -2, "maximum": 2},
    "frequency_penalty": {"minimum": -2, "maximum": 2},
    "repetition_penalty": {"exclusiveMinimum": 0, "maximum": 2},
    "max_tokens": {"minimum": 1},
    "min_tokens": {"minimum": 0},
    # A string or a list of strings: each keyword applies to the instances of its type.
    "stop": {
        "maxItems": MAX_STOP,
        "items": _STOP_STRING,
        "minLength": 1,
        "maxLength": MAX_STOP_CHARS,
    },
    "stop_token_ids": {
        "maxItems": MAX_STOP_TOKEN_IDS,
        "items": {"type": "integer", "minimum": 0},
    },
    "logit_bias": {
        "maxProperties": MAX_LOGIT_BIAS_ENTRIES,
        "propertyNames": {"pattern": "^[0-9]+$"},
        "additionalProperties": {
            "type": "number",
            "minimum": -MAX_LOGIT_BIAS,
            "maximum": MAX_LOGIT_BIAS,
        },
    },
}


def _bounded(default: Any, name: str) -> Any:
    return Field(default, json_schema_extra=_BOUNDS[name])


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL
    # SGLang's: consecutive image parts marked "video" are the frames of one video.
    modalities: Literal["image", "multi-images", "video"] | None = None


class VideoURL(BaseModel):
    """A video and, optionally, how to sample it (these win over the body's fields)."""

    url: str = Field(min_length=1)
    fps: float | None = Field(None, gt=0)
    max_frames: int | None = Field(None, ge=1)
    min_pixels: int | None = Field(None, ge=1)
    max_pixels: int | None = Field(None, ge=1)


class VideoPart(BaseModel):
    type: Literal["video_url"]
    video_url: VideoURL


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]
VIDEO_FIELDS = ("fps", "max_frames", "min_pixels", "max_pixels")


class ChatMessageParam(BaseModel):
    # Extra keys are kept, so that unsupported_field can name them (a 400, not silence).
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    # An assistant turn's calls ({"id", "type", "function": {"name", "arguments"}}), kept as
    # sent for the template; a tool turn's answer names the call it answers.
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def to_message(
        self, index: int = 0, video_defaults: dict[str, Any] | None = None
    ) -> ChatMessage:
        """APIError 400 (naming messages.`index`) for malformed tool calls. `video_defaults`:
        the body's video sampling fields, filled into each video part that lacks them."""
        content: str | list[dict[str, Any]] | None
        if isinstance(self.content, list):
            content = [p.model_dump(exclude_none=True) for p in self.content]
            for part in content:
                if part["type"] == "video_url" and video_defaults:
                    part["video_url"] = {**video_defaults, **part["video_url"]}
        else:
            content = self.content
        calls = None
        if self.tool_calls:
            calls = history_tool_calls(self.tool_calls, f"messages.{index}.tool_calls")
        return ChatMessage(
            role=self.role,
            content=content,
            name=self.name,
            tool_calls=calls,
            tool_call_id=self.tool_call_id,
        )


class StreamOptions(BaseModel):
    include_usage: bool = False
    # Every chunk carries the usage so far (vLLM's and SGLang's extension).
    continuous_usage_stats: bool = False


class _SamplingFields(BaseModel):
    """Fields shared by chat and completions (OpenAI's plus the common vLLM/SGLang extras)."""

    # Extra keys are kept, so that unsupported_field can name them (a 400, not silence).
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    temperature: float | None = _bounded(None, "temperature")
    top_p: float | None = _bounded(None, "top_p")
    top_k: int | None = _bounded(None, "top_k")
    min_p: float | None = _bounded(None, "min_p")
    n: int = _bounded(1, "n")
    stop: str | list[str] | None = _bounded(None, "stop")
    stop_token_ids: list[int] | None = _bounded(None, "stop_token_ids")
    seed: int | None = _bounded(None, "seed")
    presence_penalty: float | None = _bounded(None, "presence_penalty")
    frequency_penalty: float | None = _bounded(None, "frequency_penalty")
    repetition_penalty: float | None = _bounded(None, "repetition_penalty")
    # OpenAI's keys are token ids as JSON strings; pydantic parses them to ints (or refuses).
    logit_bias: dict[int, float] | None = _bounded(None, "logit_bias")
    ignore_eos: bool = False
    min_tokens: int = _bounded(0, "min_tokens")
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Output constraints (server/structured_output.py): at most one.
    response_format: dict[str, Any] | None = None
    regex: str | None = None  # SGLang's
    ebnf: str | None = None  # SGLang's
    json_schema: str | dict[str, Any] | None = None  # SGLang's: the schema as JSON text
    # Accepted and ignored (IGNORED_FIELDS): they change nothing in the output.
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None

    def _sampling(
        self, max_tokens: int | None, logprobs: bool, top_logprobs: int
    ) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_new_tokens=max_tokens,
            min_new_tokens=self.min_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k in (None, 0) else int(self.top_k),
            min_p=self.min_p or 0.0,
            seed=self.seed,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            skip_special_tokens=self.skip_special_tokens,
            n=self.n,
            logit_bias=dict(self.logit_bias or {}),
            grammar=request_grammar(self.response_format, self.regex, self.ebnf, self.json_schema),
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessageParam] = Field(min_length=1)
    max_tokens: int | None = _bounded(None, "max_tokens")
    max_completion_tokens: int | None = _bounded(None, "max_tokens")
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    add_generation_prompt: bool = True
    # The last (assistant) message is left open and the model continues it.
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    # Function tools as sent (server/tool_calls/plan.py checks them and keeps their key order
    # for the template); tool_choice: "none" | "auto" | "required" | a named function.
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # Video sampling for every video part that does not set its own (None: the server's).
    fps: float | None = Field(None, gt=0)
    max_frames: int | None = Field(None, ge=1)
    min_pixels: int | None = Field(None, ge=1)
    max_pixels: int | None = Field(None, ge=1)

    def video_defaults(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in VIDEO_FIELDS if getattr(self, k) is not None}

    def sampling(self) -> SamplingParams:
        limit = (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )
        return self._sampling(limit, self.logprobs, self.top_logprobs or 0)


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = _bounded(16, "max_tokens")  # OpenAI's default for completions
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False  # the prompt leads each choice's text (and its logprobs, if asked)

    def sampling(self) -> SamplingParams:
        sampling = self._sampling(self.max_tokens, self.logprobs is not None, self.logprobs or 0)
        if self.echo and self.logprobs is not None:
            sampling = msgspec.structs.replace(sampling, prompt_logprobs=True)
        return sampling


class GenerateReqInput(BaseModel):
    """SGLang's native /generate body."""

    # The schema says what the route checks: exactly one of text and input_ids (non-null).
    model_config = ConfigDict(
        extra="allow",  # kept, so that unsupported_field names them
        json_schema_extra={
            "oneOf": [
                {"required": [key], "properties": {key: {"not": {"type": "null"}}}}
                for key in ("text", "input_ids")
            ]
        },
    )

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    model: str | None = None  # SGLang's router forwards the client's (or null); checked if given
    # One prompt: an image or a list; several: one entry (None, image or list) per prompt.
    image_data: str | list[str | list[str] | None] | None = None
    # A dict, so an unknown key gets native_sampling's message naming it; its schema in
    # /openapi.json still lists the keys (and fuzzers reading it generate real ones).
    sampling_params: dict[str, Any] = Field(
        default_factory=dict, json_schema_extra=lambda schema: _native_sampling_schema(schema)
    )
    stream: bool = False
    rid: str | None = Field(None, min_length=1, max_length=256)
    return_logprob: bool = False
    # Prompt tokens from this position on get logprobs (-1: none, only the output's).
    logprob_start_len: int = Field(-1, ge=-1)
    top_logprobs_num: int = Field(0, json_schema_extra={"minimum": 0, "maximum": MAX_TOP_LOGPROBS})
    return_text_in_logprobs: bool = False

    @property
    def is_batch(self) -> bool:
        """A list of texts (or of token-id lists) is a batch, even of one prompt."""
        if isinstance(self.text, list):
            return True
        return bool(self.input_ids) and isinstance(self.input_ids[0], list)  # type: ignore[index]


_NATIVE_KEYS = {
    "max_new_tokens",
    "min_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "skip_special_tokens",
    "n",
    "logit_bias",
}


_OPENAI_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}


def _native_sampling_schema(schema: dict[str, Any]) -> None:
    """Fill in sampling_params' JSON schema from SamplingParams' own fields."""

    fields = msgspec.json.schema(SamplingParams)["$defs"]["SamplingParams"]["properties"]
    props = {k: v for k, v in fields.items() if k in _NATIVE_KEYS}
    props["stop"] = {"anyOf": [{"type": "string"}, props["stop"]]}
    for key in NATIVE_GRAMMAR_KEYS:  # SGLang's constraints, at most one (structured_output)
        props[key] = {"anyOf": [{"type": "string"}, {"type": "null"}]}
    for key, prop in props.items():
        prop.update(_BOUNDS.get(_OPENAI_NAMES.get(key, key), {}))
    schema.update(type="object", properties=props, additionalProperties=False)


# SGLang's /generate default output length (OpenAI's routes have their own).
NATIVE_MAX_NEW_TOKENS = 128


def native_sampling(
    params: dict[str, Any], logprobs: bool, top_logprobs: int, prompt_logprobs: bool = False
) -> SamplingParams:
    """SGLang's sampling_params dict -> SamplingParams; unknown keys raise KeyError(name).
    max_new_tokens defaults to SGLang's 128; null means up to the context length."""
    unknown = sorted(set(params) - _NATIVE_KEYS - set(NATIVE_GRAMMAR_KEYS))
    if unknown:
        raise KeyError(unknown[0])
    grammar = native_grammar(params)
    p = {k: v for k, v in params.items() if k not in NATIVE_GRAMMAR_KEYS}
    if isinstance(p.get("stop"), str):
        p["stop"] = [p["stop"]]
    if p.get("top_k") == 0:
        p["top_k"] = -1
    if isinstance(p.get("logit_bias"), dict):
        p["logit_bias"] = _int_keys(p["logit_bias"])
    import msgspec

    p.setdefault("max_new_tokens", NATIVE_MAX_NEW_TOKENS)
    extra = {"logprobs": logprobs, "top_logprobs": top_logprobs, "prompt_logprobs": prompt_logprobs}
    sampling = msgspec.convert({**p, **extra}, SamplingParams)
    return msgspec.structs.replace(sampling, grammar=grammar) if grammar else sampling


def _int_keys(bias: dict[Any, Any]) -> dict[Any, Any]:
    """{"50256": -100} -> {50256: -100}: JSON object keys are strings. A key that is not an
    integer leaves the dict as given, for msgspec to refuse with the key's path."""
    try:
        return {int(k): v for k, v in bias.items()}
    except (TypeError, ValueError):
        return bias


# Fields that change nothing in what the model computes, accepted and ignored as OpenAI's own
# server stores or bills by them. Every other field Fovea does not implement is a 400 naming it.
IGNORED_FIELDS = ("metadata", "service_tier", "store", "user")
# Keys an assistant message returned by the openai client carries when it is sent back as
# history: accepted while empty (null, [] or ""), refused by name otherwise.
_EMPTY_MESSAGE_KEYS = frozenset(
    {"annotations", "audio", "function_call", "reasoning_content", "refusal"}
)


def _empty(value: Any) -> bool:
    return value is None or value == [] or value == ""


# SGLang's extension fields that its router (sglang-router) writes into every request it
# forwards, at these defaults: at exactly that value each asks for nothing Fovea does not do
# (no reasoning parser, no hidden states, every request logged and answered in the
# foreground), so it passes; any other value is refused by name like every unknown field.
ROUTER_DEFAULTS: dict[str, bool] = {
    "no_stop_trim": False,
    "separate_reasoning": True,
    "stream_reasoning": True,
    "return_hidden_states": False,
    "return_routed_experts": False,
    "log_metrics": True,
    "background": False,
    "no_logs": False,
    "return_bytes": False,
    "return_entropy": False,
}


def _inert(key: str, value: Any) -> bool:
    if value is None:
        return True
    default = ROUTER_DEFAULTS.get(key)
    return type(value) is type(default) and value == default


def unsupported_field(body: _SamplingFields | GenerateReqInput) -> str | None:
    """The first request field Fovea does not implement (a dotted path), or None. A field sent
    as null, or as the router's default (ROUTER_DEFAULTS), asks for nothing and passes."""
    for key, value in (body.model_extra or {}).items():
        if not _inert(key, value):
            return key
    if isinstance(body, ChatCompletionRequest):
        for i, m in enumerate(body.messages):
            for key, value in (m.model_extra or {}).items():
                if not (key in _EMPTY_MESSAGE_KEYS and _empty(value)):
                    return f"messages.{i}.{key}"
    return None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
