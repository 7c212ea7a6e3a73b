"""Llama (and Mistral-style) decoder on tensor-parallel layers, reading the paged KV cache.

Parameter names follow HF's except the fused projections, declared in
`stacked_params_mapping`: q/k/v_proj -> qkv_proj, gate/up_proj -> gate_up_proj.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from fovea.worker.attention.base import AttentionBackend
from fovea.worker.layers import fused_cpu
from fovea.worker.layers.embedding import VocabParallelEmbedding
from fovea.worker.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from fovea.worker.layers.norm import RMSNorm
from fovea.worker.layers.rotary import RotaryEmbedding, apply_rotary_inplace, rope_settings
from fovea.worker.models.base import CausalLMBase


@dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_positions: int
    rope_theta: float
    rope_scaling: dict[str, Any]
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool

    @staticmethod
    def from_hf(cfg: dict[str, Any], *, qkv_bias: bool | None = None) -> DecoderConfig:
        """From a config.json dict (a nested text_config wins). qkv_bias overrides
        `attention_bias` (Qwen2 always has q/k/v biases)."""
        text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
        assert text is not None
        act = text.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported (only silu)")
        heads = int(text["num_attention_heads"])
        theta, scaling = rope_settings(text)
        return DecoderConfig(
            vocab_size=int(text["vocab_size"]),
            hidden_size=int(text["hidden_size"]),
            intermediate_size=int(text["intermediate_size"]),
            num_layers=int(text["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(text.get("num_key_value_heads") or heads),
            head_dim=int(text.get("head_dim") or text["hidden_size"] // heads),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            max_positions=int(text.get("max_position_embeddings", 2048)),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(
                text.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False))
            ),
            attention_bias=bool(text.get("attention_bias", False))
            if qkv_bias is None
            else qkv_bias,
            mlp_bias=bool(text.get("mlp_bias", False)),
        )


class LlamaAttention(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.attention_bias
        )
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size)
        self.num_heads = self.qkv_proj.num_heads  # per rank
        self.num_kv_heads = self.qkv_proj.num_kv_heads  # per rank
        self.head_dim = cfg.head_dim
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size

    def forward(
        self,
        x: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        attn: AttentionBackend,
    ) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)  # [T, q_size + 2 * kv_size]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary_inplace(q, k, cos_sin)  # q, k: views of this step's qkv
        out: torch.Tensor = self.o_proj(attn.forward(self.layer_id, q, k, v))
        return out


class LlamaMLP(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        inter = cfg.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            cfg.hidden_size, [inter, inter], cfg.mlp_bias
        )
        self.down_proj = RowParallelLinear(inter, cfg.hidden_size, cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.down_proj(fused_cpu.silu_mul(self.gate_up_proj(x)))
        return out


class PreNormBlock(nn.Module):
    """The Llama block shape: attention, then MLP, each after an RMSNorm that also adds the
    residual. Subclasses set self_attn, mlp, input_layernorm, post_attention_layernorm."""

    self_attn: nn.Module
    mlp: nn.Module
    input_layernorm: RMSNorm
    post_attention_layernorm: RMSNorm

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        attn: AttentionBackend,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, cos_sin, attn)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaDecoderLayer(PreNormBlock):
    def __init__(self, cfg: DecoderConfig, layer_id: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, layer_id)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DecoderStack(nn.Module):
    """Embeddings, PreNormBlocks sharing one rotary table, final norm. Subclasses set
    embed_tokens, layers, norm and rotary (anything with cos_sin(positions, dtype))."""

    embed_tokens: VocabParallelEmbedding
    layers: nn.ModuleList
    norm: RMSNorm
    rotary: Any

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionBackend,
        input_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_embeds [T, hidden], when given, replaces the embedding of input_ids."""
        x = self.embed_tokens(input_ids) if input_embeds is None else input_embeds  # [T, hidden]
        residual: torch.Tensor | None = None
        cos_sin = self.rotary.cos_sin(positions, x.dtype)
        for layer in self.layers:
            x, residual = layer(x, residual, cos_sin, attn)
        out: torch.Tensor = self.norm(x, residual)[0]
        return out


class LlamaModel(DecoderStack):
    def __init__(self, cfg: DecoderConfig, rotary: RotaryEmbedding | None = None) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # Any rotary whose cos_sin(positions, dtype) feeds apply_rotary (M-RoPE for Qwen2-VL).
        if rotary is None:
            rotary = RotaryEmbedding(
                cfg.head_dim, cfg.max_positions, cfg.rope_theta, cfg.rope_scaling
            )
        self.rotary = rotary


class LlamaForCausalLM(CausalLMBase):
    # (fused parameter, checkpoint name, shard id)
    stacked_params_mapping: Sequence[tuple[str, str, str | int]] = [
        ("qkv_proj", "q_proj", "q"),
        ("qkv_proj", "k_proj", "k"),
        ("qkv_proj", "v_proj", "v"),
        ("gate_up_proj", "gate_proj", 0),
        ("gate_up_proj", "up_proj", 1),
    ]
    # Checkpoint tensors that are not parameters here.
    skip_weight_suffixes: tuple[str, ...] = ("rotary_emb.inv_freq",)
    qkv_bias: ClassVar[bool | None] = None
    config: DecoderConfig
    model: LlamaModel

    def __init__(self, hf_config: dict[str, Any]) -> None:
        super().__init__()
        self.config = cfg = DecoderConfig.from_hf(hf_config, qkv_bias=self.qkv_bias)
        self.model = LlamaModel(cfg, self.make_rotary(cfg))
        self.make_lm_head(cfg.vocab_size, cfg.hidden_size, cfg.tie_word_embeddings)
        self.set_kv_geometry(cfg.num_heads, cfg.num_kv_heads)

    def make_rotary(self, cfg: DecoderConfig) -> RotaryEmbedding | None:
        """The decoder's rotary; None is the standard 1-D one. Subclasses (M-RoPE) override."""
        return None
