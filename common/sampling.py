"""Sampling parameters shared by server, tokenizer, scheduler and worker, and their validation."""

from __future__ import annotations

import math

import msgspec

# OpenAI caps top_logprobs at 20; so do we (it bounds the work per token).
MAX_TOP_LOGPROBS = 20
MAX_N = 128
# OpenAI allows 4 stop strings; we allow more, but bounded: every output character is matched
# against each of them, and the longest is the text held back from a stream.
MAX_STOP = 16
MAX_STOP_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
# OpenAI's logit_bias rule: values in [-100, 100]; the entry cap bounds the per-step work.
MAX_LOGIT_BIAS = 100.0
MAX_LOGIT_BIAS_ENTRIES = 1024
# Every integer crosses process boundaries as msgpack, which holds at most 64 bits.
_INT64 = 2**63


GRAMMAR_KINDS = ("json_schema", "regex", "ebnf", "structural_tag")


class Grammar(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """A constraint on the output (structured output; tool calls that must happen). `spec` is
    the JSON Schema as JSON text (`{"type": "object"}` for OpenAI's json_object), the regex,
    the EBNF grammar, or xgrammar's structural tag as JSON text; `kind` names which."""

    kind: str  # one of GRAMMAR_KINDS
    spec: str


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """How to pick each next token. Defaults are OpenAI's."""

    max_new_tokens: int | None = None  # None: up to the context length
    min_new_tokens: int = 0
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0) means off
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: bool = False
    top_logprobs: int = 0
    # Also the logprob (and top `top_logprobs`) of each prompt token i >= 1 given tokens < i.
    prompt_logprobs: bool = False
    skip_special_tokens: bool = True
    n: int = 1
    logit_bias: dict[int, float] = {}  # token id -> added to its logit before sampling
    # Every sampled token must keep the output inside this grammar (None: unconstrained).
    grammar: Grammar | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )


class SamplingError(ValueError):
    """A parameter is out of range; `param` names it for the OpenAI error object."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


_FLOATS = (
    "temperature",
    "top_p",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
)


def validate_sampling(
    p: SamplingParams, vocab_size: int | None = None, context_length: int | None = None
) -> None:
    """Raise SamplingError for the first parameter out of range. With `vocab_size`, logit_bias
    keys must be ids below it; with `context_length`, max_tokens and min_tokens must fit in it
    (the tokenizer checks them again against the prompt's length)."""
    # JSON's NaN and Infinity literals parse to floats; NaN fails every comparison, so the range
    # checks below would catch it only by accident and with a confusing message.
    for param in _FLOATS:
        value = getattr(p, param)
        if not math.isfinite(value):
            raise SamplingError(param, f"{param} must be a finite number, got {value}")
    longest = context_length if context_length is not None else _INT64 - 1
    for value, param in ((p.max_new_tokens, "max_tokens"), (p.min_new_tokens, "min_tokens")):
        if value is not None and value > longest:
            raise SamplingError(
                param,
                f"{param} is {value}, more than this model's maximum context length of "
                f"{longest} tokens"
                if context_length is not None
                else f"{param} must be at most {longest}, got {value}",
            )
    _check_logit_bias(p.logit_bias, vocab_size)
    checks: list[tuple[bool, str, str]] = [
        (
            p.max_new_tokens is not None and p.max_new_tokens < 1,
            "max_tokens",
            f"max_tokens must be at least 1, got {p.max_new_tokens}",
        ),
        (p.min_new_tokens < 0, "min_tokens", f"min_tokens must be >= 0, got {p.min_new_tokens}"),
        (
            p.max_new_tokens is not None and p.min_new_tokens > p.max_new_tokens,
            "min_tokens",
            f"min_tokens ({p.min_new_tokens}) must not exceed max_tokens ({p.max_new_tokens})",
        ),
        (
            not 0.0 <= p.temperature <= 100.0,
            "temperature",
            f"temperature must be in [0, 100], got {p.temperature}",
        ),
        (not 0.0 < p.top_p <= 1.0, "top_p", f"top_p must be in (0, 1], got {p.top_p}"),
        (
            not -1 <= p.top_k < _INT64,
            "top_k",
            f"top_k must be -1 (off) or in [0, 2**63), got {p.top_k}",
        ),
        (not 0.0 <= p.min_p <= 1.0, "min_p", f"min_p must be in [0, 1], got {p.min_p}"),
        (
            not -2.0 <= p.presence_penalty <= 2.0,
            "presence_penalty",
            f"presence_penalty must be in [-2, 2], got {p.presence_penalty}",
        ),
        (
            not -2.0 <= p.frequency_penalty <= 2.0,
            "frequency_penalty",
            f"frequency_penalty must be in [-2, 2], got {p.frequency_penalty}",
        ),
        (
            not 0.0 < p.repetition_penalty <= 2.0,
            "repetition_penalty",
            f"repetition_penalty must be in (0, 2], got {p.repetition_penalty}",
        ),
        (
            not 0 <= p.top_logprobs <= MAX_TOP_LOGPROBS,
            "top_logprobs",
            f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {p.top_logprobs}",
        ),
        (not 1 <= p.n <= MAX_N, "n", f"n must be in [1, {MAX_N}], got {p.n}"),
        (
            any(not s for s in p.stop),
            "stop",
            "stop strings must not be empty",
        ),
        (len(p.stop) > MAX_STOP, "stop", f"at most {MAX_STOP} stop strings, got {len(p.stop)}"),
        (
            any(len(s) > MAX_STOP_CHARS for s in p.stop),
            "stop",
            f"a stop string may have at most {MAX_STOP_CHARS} characters, got "
            f"{max(map(len, p.stop), default=0)}",
        ),
        (
            len(p.stop_token_ids) > MAX_STOP_TOKEN_IDS,
            "stop_token_ids",
            f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids, got {len(p.stop_token_ids)}",
        ),
        (
            any(not 0 <= t < _INT64 for t in p.stop_token_ids),
            "stop_token_ids",
            "stop_token_ids must be token ids in [0, 2**63)",
        ),
        (
            p.seed is not None and not 0 <= p.seed < 2**63,
            "seed",
            f"seed must be in [0, 2**63), got {p.seed}",
        ),
    ]
    for failed, param, message in checks:
        if failed:
            raise SamplingError(param, message)


def _check_logit_bias(bias: dict[int, float], vocab_size: int | None) -> None:
    if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
        raise SamplingError(
            "logit_bias",
            f"logit_bias may have at most {MAX_LOGIT_BIAS_ENTRIES} entries, got {len(bias)}",
        )
    limit = vocab_size if vocab_size is not None else _INT64
    for token, value in bias.items():
        if not 0 <= token < limit:
            raise SamplingError(
                "logit_bias",
                f"logit_bias key {token} is not a token id: the vocabulary has {limit} tokens"
                if vocab_size is not None
                else f"logit_bias key {token} is not a token id",
            )
        if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:  # False for NaN too
            raise SamplingError(
                "logit_bias",
                f"logit_bias values must be in [-100, 100], got {value} for token {token}",
            )
