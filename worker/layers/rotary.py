"""Rotary position embedding (the rotate-half / NeoX layout HF Llama and Qwen2 use).

Reads either `rope_parameters` (transformers v5) or `rope_theta` + `rope_scaling` (older
configs). Rope types: default and llama3; Qwen2-VL's M-RoPE (`mrope_section`, older configs say
type "mrope") is default frequencies with positions split over three axes (MRotaryEmbedding).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from fovea.worker.layers import fused_cpu

SUPPORTED_ROPE_TYPES = ("default", "llama3")


def rope_settings(cfg: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """(theta, scaling dict with at least 'rope_type') from a text config dict."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        scaling = dict(params)
        theta = float(scaling.pop("rope_theta"))
    else:
        theta = float(cfg.get("rope_theta", 10000.0))
        scaling = dict(cfg.get("rope_scaling") or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "mrope":  # older Qwen2-VL configs; the frequencies are the default ones
        rope_type = "default"
    scaling["rope_type"] = rope_type
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope type {rope_type!r} is not supported (supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    return theta, scaling


def inv_frequencies(head_dim: int, theta: float, scaling: dict[str, Any]) -> torch.Tensor:
    """[head_dim // 2] float32, as transformers computes them."""
    exps = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exps)
    if scaling["rope_type"] == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryEmbedding(nn.Module):
    def __init__(
        self, head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any]
    ) -> None:
        super().__init__()
        inv_freq = inv_frequencies(head_dim, theta, scaling)
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # [max_positions, head_dim // 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_positions, head_dim]
        self.cos: torch.Tensor
        self.sin: torch.Tensor
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Once per step: positions [T] -> cos, sin [T, 1, head_dim] in the activation dtype."""
        cos = self.cos[positions].unsqueeze(1).to(dtype)
        sin = self.sin[positions].unsqueeze(1).to(dtype)
        return cos, sin


class MRotaryEmbedding(RotaryEmbedding):
    """Qwen2-VL multimodal RoPE: frequency j of the head_dim/2 rotates by the temporal, height
    or width position as `mrope_section` (e.g. [16, 24, 24], summing to head_dim/2) assigns it.
    cos_sin has RotaryEmbedding's layout, so apply_rotary is shared."""

    def __init__(
        self,
        head_dim: int,
        max_positions: int,
        theta: float,
        scaling: dict[str, Any],
        mrope_section: list[int],
    ) -> None:
        super().__init__(head_dim, max_positions, theta, scaling)
        if sum(mrope_section) != head_dim // 2:
            raise ValueError(
                f"mrope_section {mrope_section} must sum to head_dim/2={head_dim // 2}"
            )
        axis = torch.cat([torch.full((n,), i % 3) for i, n in enumerate(mrope_section)])
        self.axis: torch.Tensor  # [head_dim] int64: the position axis each column reads
        self.register_buffer("axis", torch.cat((axis, axis)).long(), persistent=False)

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [3, T] (t, h, w) -> cos, sin [T, 1, head_dim]; [T] means t = h = w."""
        if positions.dim() == 1:
            return super().cos_sin(positions, dtype)
        index = self.axis.view(1, 1, -1).expand(1, positions.shape[1], -1)  # [1, T, head_dim]
        cos = self.cos[positions].gather(0, index)[0]  # [3, T, head_dim] -> [T, head_dim]
        sin = self.sin[positions].gather(0, index)[0]
        return cos.unsqueeze(1).to(dtype), sin.unsqueeze(1).to(dtype)


def apply_rotary_inplace(
    q: torch.Tensor, k: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_rotary, writing into q and k where the fused CPU kernel applies (the caller owns
    them: e.g. views of a fresh qkv projection)."""
    if fused_cpu.rotary_inplace(q, k, *cos_sin):
        return q, k
    return apply_rotary(q, k, cos_sin)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, heads, head_dim], k [T, kv_heads, head_dim]; cos_sin from RotaryEmbedding."""
    cos, sin = cos_sin
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
