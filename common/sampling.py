"""Sampling parameters shared by server, tokenizer, scheduler and worker, and their validation."""

from __future__ import annotations

import msgspec

# OpenAI caps top_logprobs at 20; so do we (it bounds the work per token).
MAX_TOP_LOGPROBS = 20


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
    skip_special_tokens: bool = True
    n: int = 1

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


def validate_sampling(p: SamplingParams) -> None:
    """Raise SamplingError for the first parameter out of range."""
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
        (p.top_k < -1, "top_k", f"top_k must be -1 (off) or >= 0, got {p.top_k}"),
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
        (p.n < 1 or p.n > 128, "n", f"n must be in [1, 128], got {p.n}"),
        (
            any(not s for s in p.stop),
            "stop",
            "stop strings must not be empty",
        ),
        (len(p.stop) > 16, "stop", f"at most 16 stop strings, got {len(p.stop)}"),
        (
            any(t < 0 for t in p.stop_token_ids),
            "stop_token_ids",
            "stop_token_ids must be non-negative",
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
