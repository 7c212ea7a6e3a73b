"""OpenAI request schemas (pydantic, validated by FastAPI) and their mapping to SamplingParams.

Responses are built as plain dicts in app.py and encoded with msgspec: faster than pydantic
response models on the hot streaming path.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fovea.common.messages import ChatMessage
from fovea.common.sampling import MAX_TOP_LOGPROBS, SamplingParams


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessageParam(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def to_message(self) -> ChatMessage:
        content: str | list[dict[str, Any]] | None
        if isinstance(self.content, list):
            content = [p.model_dump(exclude_none=True) for p in self.content]
        else:
            content = self.content
        return ChatMessage(role=self.role, content=content, name=self.name)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingFields(BaseModel):
    """Fields shared by chat and completions (OpenAI's plus the common vLLM/SGLang extras)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

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
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessageParam] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    def sampling(self) -> SamplingParams:
        limit = (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )
        return self._sampling(limit, self.logprobs, self.top_logprobs or 0)


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False

    def sampling(self) -> SamplingParams:
        return self._sampling(self.max_tokens, self.logprobs is not None, self.logprobs or 0)


class GenerateReqInput(BaseModel):
    """SGLang's native /generate body."""

    model_config = ConfigDict(extra="ignore")

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    # One prompt: an image or a list; several: one entry (None, image or list) per prompt.
    image_data: str | list[str | list[str] | None] | None = None
    sampling_params: dict[str, Any] = Field(default_factory=dict)
    stream: bool = False
    return_logprob: bool = False
    top_logprobs_num: int = 0


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
}


def native_sampling(params: dict[str, Any], logprobs: bool, top_logprobs: int) -> SamplingParams:
    """SGLang's sampling_params dict -> SamplingParams; unknown keys raise KeyError(name)."""
    unknown = sorted(set(params) - _NATIVE_KEYS)
    if unknown:
        raise KeyError(unknown[0])
    p = dict(params)
    if isinstance(p.get("stop"), str):
        p["stop"] = [p["stop"]]
    if p.get("top_k") == 0:
        p["top_k"] = -1
    import msgspec

    return msgspec.convert(
        {**p, "logprobs": logprobs, "top_logprobs": top_logprobs}, SamplingParams
    )


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
