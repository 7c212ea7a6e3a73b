"""The fields SGLang's router writes into every request it forwards (as sglang-router 0.3.2
sends them, read off the wire): accepted at the router's defaults, refused by name at any
other value, on chat, completions and /generate alike."""

from __future__ import annotations

from typing import Any

import pytest

from fovea.server.openai_protocol import (
    ROUTER_DEFAULTS,
    ChatCompletionRequest,
    CompletionRequest,
    GenerateReqInput,
    unsupported_field,
)

# Bodies exactly as the router forwarded them (its defaults included).
CHAT = {
    "messages": [{"role": "user", "content": "Hello"}], "model": "tiny-vl", "logprobs": False,
    "max_completion_tokens": 5, "stream": False, "temperature": 0.0, "no_stop_trim": False,
    "ignore_eos": False, "continue_final_message": False, "skip_special_tokens": True,
    "separate_reasoning": True, "stream_reasoning": True, "return_hidden_states": False,
}  # fmt: skip
COMPLETION = {
    "model": "tiny-vl", "prompt": "Hello", "max_tokens": 5, "temperature": 0.0, "stream": False,
    "echo": False, "no_stop_trim": False, "ignore_eos": False, "skip_special_tokens": True,
    "return_hidden_states": False,
}  # fmt: skip
GENERATE = {
    "text": "Hello", "model": None, "sampling_params": {"temperature": 0.0, "max_new_tokens": 5},
    "return_text_in_logprobs": False, "stream": False, "log_metrics": True,
    "return_hidden_states": False, "background": False, "no_logs": False, "return_bytes": False,
    "return_entropy": False,
}  # fmt: skip
MODELS: dict[str, tuple[type[Any], dict[str, Any]]] = {
    "chat": (ChatCompletionRequest, CHAT),
    "completion": (CompletionRequest, COMPLETION),
    "generate": (GenerateReqInput, GENERATE),
}


@pytest.mark.parametrize("route", list(MODELS))
def test_the_routers_bodies_pass(route: str) -> None:
    model, body = MODELS[route]
    assert unsupported_field(model(**body)) is None


@pytest.mark.parametrize("route", list(MODELS))
def test_a_router_field_asking_for_something_is_refused_by_name(route: str) -> None:
    model, body = MODELS[route]
    router_keys = [key for key in body if key in ROUTER_DEFAULTS]
    assert router_keys  # each route's body carries some
    for key in router_keys:
        assert unsupported_field(model(**{**body, key: not ROUTER_DEFAULTS[key]})) == key
        # Same truth value, another type: not the default either (0 is not false).
        assert unsupported_field(model(**{**body, key: int(ROUTER_DEFAULTS[key])})) == key
    assert unsupported_field(model(**{**body, "lora_path": "x"})) == "lora_path"
