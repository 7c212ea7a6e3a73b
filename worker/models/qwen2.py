"""Qwen2: Llama's architecture with biases on the q/k/v projections."""

from __future__ import annotations

from typing import ClassVar

from fovea.worker.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):  # type: ignore[misc,unused-ignore]
    qkv_bias: ClassVar[bool | None] = True
