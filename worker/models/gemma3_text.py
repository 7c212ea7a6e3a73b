"""Gemma 3 language model (`Gemma3ForCausalLM`, and the decoder of the multimodal model).

Differences from Llama, all as in transformers: RMSNorm scales by (1 + weight) in float32;
embeddings are multiplied by sqrt(hidden) (rounded to the weight dtype); q and k are
RMS-normed per head before rotary; every layer has pre/post attention and pre/post
feed-forward norms; the MLP is gelu(tanh); attention scores are scaled by
query_pre_attn_scalar ** -0.5; logits are soft-capped by final_logit_softcapping when set.

Layers are "sliding_attention" (local: a token sees the `sliding_window` most recent tokens,
itself included; rope base `rope_local_base_freq`) or "full_attention" (global; rope base
`rope_theta`, with the config's rope scaling). The model exposes `layer_windows` and
`attention_scale` for the attention backend, whose local layers read only their window.

KV memory: the model runner keeps the local layers' K/V in a pool of their own, from which the
scheduler frees what left each sequence's window (worker/kv_pool.py, scheduler/window_slots.py;
docs/design.md, "Sliding-window layers"); the model itself only sees the attention backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fovea.worker.attention.base import AttentionBackend
from fovea.worker.layers.embedding import VocabParallelEmbedding
from fovea.worker.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from fovea.worker.layers.rotary import apply_rotary
from fovea.worker.models.base import CausalLMBase

SLIDING, FULL = "sliding_attention", "full_attention"


def _rope(params: dict[str, Any], what: str) -> tuple[float, float]:
    """(theta, linear factor) of one layer type's rope parameters."""
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "linear"):
        raise ValueError(f"Gemma 3 {what} rope type {rope_type!r} is not supported")
    factor = float(params.get("factor", 1.0)) if rope_type == "linear" else 1.0
    return float(params["rope_theta"]), factor


@dataclass(frozen=True)
class Gemma3TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_positions: int
    query_pre_attn_scalar: float
    sliding_window: int
    layer_types: tuple[str, ...]
    rope_global: tuple[float, float]  # (theta, linear factor) of full-attention layers
    rope_local: tuple[float, float]  # of sliding-window layers
    final_logit_softcapping: float | None
    tie_word_embeddings: bool
    attention_bias: bool

    @staticmethod
    def from_hf(cfg: dict[str, Any]) -> Gemma3TextConfig:
        """From config.json (a nested text_config wins; the top level's tie_word_embeddings
        wins, as in transformers). Missing keys take transformers' Gemma3TextConfig defaults:
        hub checkpoints saved only the fields that differ."""
        nested = cfg.get("text_config")
        text = nested if isinstance(nested, dict) else cfg
        act = text.get("hidden_activation") or text.get("hidden_act") or "gelu_pytorch_tanh"
        if act != "gelu_pytorch_tanh":
            raise ValueError(f"Gemma 3 hidden_activation {act!r} is not supported")
        if text.get("attn_logit_softcapping") is not None:
            raise ValueError("Gemma 3 attn_logit_softcapping is not supported")
        if text.get("use_bidirectional_attention"):
            raise ValueError("Gemma 3 use_bidirectional_attention (an encoder) is not supported")
        layers = int(text.get("num_hidden_layers", 26))
        types = text.get("layer_types")
        if types is None:  # older configs: every `pattern`-th layer is global
            pattern = int(text.get("sliding_window_pattern", 6))
            types = [SLIDING if (i + 1) % pattern else FULL for i in range(layers)]
        if len(types) != layers or set(types) - {SLIDING, FULL}:
            raise ValueError(f"Gemma 3 layer_types {types} do not fit {layers} layers")
        params = text.get("rope_parameters")
        if isinstance(params, dict) and FULL in params:  # transformers v5: per layer type
            rope_global = _rope(params[FULL], "global")
            rope_local = _rope(params.get(SLIDING) or {"rope_theta": 10000.0}, "local")
        else:  # older: rope_theta (+ rope_scaling) global, rope_local_base_freq local
            scaling = dict(text.get("rope_scaling") or {})
            scaling["rope_theta"] = text.get("rope_theta", 1_000_000.0)
            rope_global = _rope(scaling, "global")
            rope_local = (float(text.get("rope_local_base_freq", 10_000.0)), 1.0)
        heads = int(text.get("num_attention_heads", 8))
        tie = cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", True))
        return Gemma3TextConfig(
            vocab_size=int(text.get("vocab_size", 262_208)),
            hidden_size=int(text.get("hidden_size", 2304)),
            intermediate_size=int(text.get("intermediate_size", 9216)),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(text.get("num_key_value_heads", 4)),
            head_dim=int(text.get("head_dim", 256)),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            max_positions=int(text.get("max_position_embeddings", 131_072)),
            query_pre_attn_scalar=float(text.get("query_pre_attn_scalar", 256)),
            sliding_window=int(text.get("sliding_window") or 4096),
            layer_types=tuple(types),
            rope_global=rope_global,
            rope_local=rope_local,
            final_logit_softcapping=text.get("final_logit_softcapping"),
            tie_word_embeddings=bool(tie),
            attention_bias=bool(text.get("attention_bias", False)),
        )


class GemmaRMSNorm(nn.Module):
    """x / rms(x) * (1 + weight), computed in float32 and cast back (Gemma's convention)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).to(x.dtype)


class GemmaRotary(nn.Module):
    """Default or linearly scaled rope, computed per step from the positions (as transformers
    does: no table of max_position_embeddings rows, which is 131k for Gemma 3)."""

    def __init__(self, head_dim: int, theta: float, factor: float) -> None:
        super().__init__()
        exps = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        self.inv_freq: torch.Tensor
        self.register_buffer("inv_freq", 1.0 / theta**exps / factor, persistent=False)

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, 1, head_dim] in the activation dtype."""
        freqs = positions.float()[:, None] * self.inv_freq.float()  # [T, head_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


class Gemma3Attention(nn.Module):
    def __init__(self, cfg: Gemma3TextConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.attention_bias
        )
        self.o_proj = RowParallelLinear(
            cfg.num_heads * cfg.head_dim, cfg.hidden_size, cfg.attention_bias
        )
        self.q_norm = GemmaRMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.num_heads = self.qkv_proj.num_heads  # per rank
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size

    def forward(
        self,
        x: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        attn: AttentionBackend,
    ) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.q_norm(q.view(t, self.num_heads, self.head_dim))
        k = self.k_norm(k.view(t, self.num_kv_heads, self.head_dim))
        q, k = apply_rotary(q, k, cos_sin)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        out: torch.Tensor = self.o_proj(attn.forward(self.layer_id, q, k, v))
        return out


class Gemma3MLP(nn.Module):
    def __init__(self, cfg: Gemma3TextConfig) -> None:
        super().__init__()
        inter = cfg.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [inter, inter])
        self.down_proj = RowParallelLinear(inter, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        out: torch.Tensor = self.down_proj(F.gelu(gate, approximate="tanh") * up)
        return out


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, cfg: Gemma3TextConfig, layer_id: int) -> None:
        super().__init__()
        self.self_attn = Gemma3Attention(cfg, layer_id)
        self.mlp = Gemma3MLP(cfg)
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(h, eps)
        self.post_attention_layernorm = GemmaRMSNorm(h, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(h, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(h, eps)

    def forward(
        self,
        x: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        attn: AttentionBackend,
    ) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), cos_sin, attn)
        x = x + self.post_attention_layernorm(h)
        h = self.mlp(self.pre_feedforward_layernorm(x))
        return x + self.post_feedforward_layernorm(h)  # type: ignore[no-any-return]


class Gemma3TextModel(nn.Module):
    def __init__(self, cfg: Gemma3TextConfig) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        # sqrt(hidden) rounded to the weight dtype, as transformers (55.4256 -> 55.5 in bf16).
        self.embed_scale = torch.tensor(cfg.hidden_size**0.5).to(self.embed_tokens.weight.dtype)
        self.layers = nn.ModuleList(Gemma3DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_global = GemmaRotary(cfg.head_dim, *cfg.rope_global)
        self.rotary_local = GemmaRotary(cfg.head_dim, *cfg.rope_local)
        self.sliding = [t == SLIDING for t in cfg.layer_types]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """[T] -> scaled embeddings [T, hidden]."""
        emb: torch.Tensor = self.embed_tokens(ids)
        return emb * self.embed_scale.to(emb.device, emb.dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionBackend,
        input_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.embed(input_ids) if input_embeds is None else input_embeds  # [T, hidden]
        cs_global = self.rotary_global.cos_sin(positions, x.dtype)
        cs_local = self.rotary_local.cos_sin(positions, x.dtype)
        for layer, sliding in zip(self.layers, self.sliding, strict=True):
            x = layer(x, cs_local if sliding else cs_global, attn)
        return self.norm(x)  # type: ignore[no-any-return]


class Gemma3ForCausalLM(CausalLMBase):
    """forward's input_embeds, when given, are already scaled text embeddings (the
    multimodal class's embed_tokens) with image rows replaced."""

    # (fused parameter, checkpoint name, shard id)
    stacked_params_mapping: Sequence[tuple[str, str, str | int]] = [
        ("qkv_proj", "q_proj", "q"),
        ("qkv_proj", "k_proj", "k"),
        ("qkv_proj", "v_proj", "v"),
        ("gate_up_proj", "gate_proj", 0),
        ("gate_up_proj", "up_proj", 1),
    ]
    config: Gemma3TextConfig
    model: Gemma3TextModel

    def __init__(self, hf_config: dict[str, Any]) -> None:
        super().__init__()
        self.config = cfg = Gemma3TextConfig.from_hf(hf_config)
        self.model = Gemma3TextModel(cfg)
        # Tied: the head is the embedding; a checkpoint's copy of it (any prefix) is skipped.
        self.make_lm_head(cfg.vocab_size, cfg.hidden_size, cfg.tie_word_embeddings)
        self.skip_weight_suffixes = ("rotary_emb.inv_freq",)
        if cfg.tie_word_embeddings:
            self.skip_weight_suffixes += ("lm_head.weight",)
        self.set_kv_geometry(cfg.num_heads, cfg.num_kv_heads)
        # For the attention backend: the window of each layer (0: global) and the score scale.
        self.layer_windows = [cfg.sliding_window if t == SLIDING else 0 for t in cfg.layer_types]
        self.attention_scale = cfg.query_pre_attn_scalar**-0.5

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, hidden] -> [n, vocab] float32, soft-capped when the config says so."""
        logits: torch.Tensor = self.lm_head(hidden)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()
