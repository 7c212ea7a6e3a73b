"""DeepSeek-V2 decoder as DeepSeek-VL2 ships it (its `modeling_deepseek.py`): RMSNorm decoder
layers whose MLP is dense for the first `first_k_dense_replace` layers and a DeepSeek MoE
(worker/layers/moe.py) after, and whose attention is one of
- MLA (`use_mla`, -small and the full model): queries from q_proj (or the low-rank
  q_a_proj -> q_a_layernorm -> q_b_proj), keys and values decompressed per head from one
  latent (kv_a_proj_with_mqa -> kv_a_layernorm -> kv_b_proj) plus one shared rotary key part;
- MHA (-tiny, `use_mla: false`): transformers' LlamaAttention (q/k/v/o projections, GQA,
  rotary over the whole head, head_dim = hidden / heads).

MLA and the KV pool (`kv_layout`): by default the pool keeps the latent, one row of
kv_lora_rank + qk_rope_head_dim values per token and layer (the normalized compressed KV, then
the rotated shared rope key; DeepSeek-VL2-small: 576 values). Decode absorbs kv_b_proj's key
half into the query and its value half into the output, so it attends over latent rows
directly; prefill decompresses the latent rows of each chunk's keys (a cached prefix's and
earlier chunks' read back from the pool) through kv_b_proj and attends per head
(worker/attention/base.py, forward_latent). `--mla-kv-cache decompressed` keeps the earlier
layout instead: per-head K = [k_nope, k_rope] and V zero-padded to max(qk_head_dim,
v_head_dim), 2 * heads * head_dim values (-small: 6144, 10.7x the latent) and the output cut
back to v_head_dim. The score scale is qk_head_dim ** -0.5 times yarn's mscale(factor,
mscale_all_dim) ** 2 (`attention_scale`) on both paths: absorption leaves the scores unchanged.

MLA's rotary part: the reference de-interleaves it (pairs (2i, 2i+1) -> halves) and then
rotates halves; done here the same way, so q and k carry the reference's values.

Tensor parallel: attention heads split across ranks (q/q_b/kv_b column-parallel, o row-
parallel; the latent projections are replicated); MLPs and experts as worker/layers/moe.py.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fovea.common.families.deepseek_vl2 import DeepseekV2TextConfig
from fovea.worker.attention.base import AttentionBackend
from fovea.worker.distributed import tp_size
from fovea.worker.kv_pool import KVLayout
from fovea.worker.layers.embedding import VocabParallelEmbedding
from fovea.worker.layers.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    divide,
)
from fovea.worker.layers.moe import DeepseekMoE, GatedMLP
from fovea.worker.layers.norm import RMSNorm
from fovea.worker.layers.rotary import apply_rotary, inv_frequencies
from fovea.worker.models.base import CausalLMBase
from fovea.worker.models.llama import DecoderStack, PreNormBlock


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def softmax_scale(cfg: DeepseekV2TextConfig) -> float:
    """MLA's score scale: qk_head_dim ** -0.5, times mscale(factor, mscale_all_dim) ** 2 under
    rope scaling that sets mscale_all_dim."""
    scale: float = cfg.qk_head_dim**-0.5
    rs = cfg.rope_scaling or {}
    if rs and rs.get("mscale_all_dim"):
        scale *= yarn_mscale(float(rs["factor"]), float(rs["mscale_all_dim"])) ** 2
    return scale


class DeepseekRotary(nn.Module):
    """cos/sin tables [max_positions, dim] float32 (rotate-half layout, as RotaryEmbedding's,
    so apply_rotary is shared) for the reference's default, linear and yarn rope."""

    def __init__(self, dim: int, cfg: DeepseekV2TextConfig) -> None:
        super().__init__()
        rs, kind = cfg.rope_scaling or {}, cfg.rope_type
        t = torch.arange(cfg.max_positions, dtype=torch.float32)
        inv_freq = inv_frequencies(dim, cfg.rope_theta, {"rope_type": "default"})
        mscale = 1.0
        if kind == "linear":
            t = t / float(rs["factor"])
        elif kind == "yarn":
            inv_freq, mscale = self._yarn(dim, cfg.rope_theta, rs)
        emb = torch.outer(t, inv_freq).repeat(1, 2)  # [max_positions, dim]
        self.cos: torch.Tensor
        self.sin: torch.Tensor
        self.register_buffer("cos", emb.cos() * mscale, persistent=False)
        self.register_buffer("sin", emb.sin() * mscale, persistent=False)

    @staticmethod
    def _yarn(dim: int, base: float, rs: dict[str, Any]) -> tuple[torch.Tensor, float]:
        """(inv_freq [dim // 2], cos/sin scale): frequencies blend from extrapolated (fast
        dims) to interpolated by `factor` (slow dims) over a linear ramp, as the reference."""
        factor = float(rs["factor"])
        old_ctx = float(rs.get("original_max_position_embeddings", 4096))
        fast, slow = float(rs.get("beta_fast", 32)), float(rs.get("beta_slow", 1))

        def correction_dim(rotations: float) -> float:
            return (dim * math.log(old_ctx / (rotations * 2 * math.pi))) / (2 * math.log(base))

        low = max(math.floor(correction_dim(fast)), 0)
        high = min(math.ceil(correction_dim(slow)), dim - 1)
        exps = torch.arange(0, dim, 2, dtype=torch.float32) / dim
        extra, inter = 1.0 / (base**exps), 1.0 / (factor * base**exps)
        ramp = (torch.arange(dim // 2, dtype=torch.float32) - low) / (
            (high + 0.001 if low == high else high) - low
        )
        keep = 1.0 - ramp.clamp(0, 1)  # 1: extrapolate (keep the original frequency)
        mscale = yarn_mscale(factor, float(rs.get("mscale", 1))) / yarn_mscale(
            factor, float(rs.get("mscale_all_dim", 0))
        )
        return inter * (1 - keep) + extra * keep, mscale

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, 1, dim] in the activation dtype."""
        cos, sin = self.cos[positions], self.sin[positions]
        return cos.unsqueeze(1).to(dtype), sin.unsqueeze(1).to(dtype)


def _deinterleave(x: torch.Tensor) -> torch.Tensor:
    """[..., d]: (x0, x1, x2, x3, ...) -> (x0, x2, ..., x1, x3, ...), the reference's order."""
    *lead, d = x.shape
    return x.reshape(*lead, d // 2, 2).transpose(-1, -2).reshape(*lead, d)


class MLAttention(nn.Module):
    def __init__(self, cfg: DeepseekV2TextConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        h, heads = cfg.hidden_size, cfg.num_heads
        self.heads = divide(heads, tp_size(), "attention heads")  # per rank
        self.nope, self.rope = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.v_dim = cfg.v_head_dim
        self.kv_lora_rank, self.head_dim = cfg.kv_lora_rank, cfg.head_dim
        qk, bias = cfg.qk_head_dim, cfg.attention_bias
        self.q_proj: ColumnParallelLinear | None = None
        if cfg.q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(h, heads * qk)
        else:
            self.q_a_proj = nn.Linear(h, cfg.q_lora_rank, bias=bias)  # replicated
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)
            self.q_b_proj = ColumnParallelLinear(cfg.q_lora_rank, heads * qk)
        # The latent and the shared rotary key: replicated, every head reads them.
        self.kv_a_proj_with_mqa = nn.Linear(h, cfg.kv_lora_rank + self.rope, bias=bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank)
        self.kv_b_proj = ColumnParallelLinear(cfg.kv_lora_rank, heads * (self.nope + self.v_dim))
        self.o_proj = RowParallelLinear(heads * self.v_dim, h, bias=bias)
        self._absorbed: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(
        self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], attn: AttentionBackend
    ) -> torch.Tensor:
        t, heads = x.shape[0], self.heads
        if self.q_proj is not None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))[0])
        q = q.view(t, heads, self.nope + self.rope)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope], dim=-1)
        latent = self.kv_a_layernorm(latent)[0]  # [T, kv_lora_rank]
        q_pe, k_pe = apply_rotary(
            _deinterleave(q[..., self.nope :]), _deinterleave(k_pe.view(t, 1, self.rope)), cos_sin
        )
        q = torch.cat([q[..., : self.nope], q_pe], dim=-1)  # [T, heads, qk_head_dim]
        if attn.pool.kind == "mla_latent":
            rows = torch.cat([latent, k_pe[:, 0]], dim=-1)  # [T, kv_lora_rank + rope]
            out = attn.forward_latent(self.layer_id, q, rows, self)  # [T, heads, v_dim]
            return self.o_proj(out.reshape(t, heads * self.v_dim))  # type: ignore[no-any-return]
        kv = self.kv_b_proj(latent).view(t, heads, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(t, heads, self.rope)], dim=-1)
        pad = self.head_dim - q.shape[-1]  # zeros in q and k leave the scores unchanged
        if pad:
            q, k = F.pad(q, (0, pad)), F.pad(k, (0, pad))
        v = F.pad(v, (0, self.head_dim - self.v_dim))  # [T, heads, head_dim]
        out = attn.forward(self.layer_id, q, k, v).view(t, heads, self.head_dim)
        return self.o_proj(out[..., : self.v_dim].reshape(t, heads * self.v_dim))  # type: ignore[no-any-return]

    # ---- the up-projections as latent attention uses them (attention/base.py LatentProjections)

    def _up_projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj's halves per head, made once from the loaded weight: W_UK [heads, nope,
        kv_lora_rank] and W_UV^T [heads, kv_lora_rank, v_dim], contiguous for bmm."""
        if self._absorbed is None:
            w = self.kv_b_proj.weight.detach().reshape(self.heads, self.nope + self.v_dim, -1)
            w_uk, w_uv = torch.split(w, [self.nope, self.v_dim], dim=1)
            self._absorbed = (w_uk.contiguous(), w_uv.transpose(1, 2).contiguous())
        return self._absorbed

    def absorb_query(self, q: torch.Tensor) -> torch.Tensor:
        w_uk, _ = self._up_projections()
        q_lat = torch.bmm(q[..., : self.nope].transpose(0, 1), w_uk)  # [heads, B, kv_lora_rank]
        return torch.cat([q_lat.transpose(0, 1), q[..., self.nope :]], dim=-1)

    def absorb_output(self, o: torch.Tensor) -> torch.Tensor:
        _, w_uv_t = self._up_projections()
        return torch.bmm(o.transpose(0, 1), w_uv_t).transpose(0, 1)  # [B, heads, v_dim]

    def expand(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = rows.shape[0]
        latent, k_pe = torch.split(rows, [self.kv_lora_rank, self.rope], dim=-1)
        kv = self.kv_b_proj(latent).view(n, self.heads, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, None].expand(n, self.heads, self.rope)], dim=-1)
        return k, v


class MHAttention(nn.Module):
    """LlamaAttention. The fused projection is `qkv`, not `qkv_proj`: the SigLIP tower of the
    same checkpoint has a fused `qkv_proj` loaded whole, and the loader's stacked mapping
    matches parameter names by substring."""

    def __init__(self, cfg: DeepseekV2TextConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        hd, bias = cfg.head_dim, cfg.attention_bias
        self.qkv = QKVParallelLinear(cfg.hidden_size, hd, cfg.num_heads, cfg.num_kv_heads, bias)
        self.o_proj = RowParallelLinear(cfg.num_heads * hd, cfg.hidden_size, bias=bias)
        self.heads, self.kv_heads, self.head_dim = self.qkv.num_heads, self.qkv.num_kv_heads, hd
        self.sizes = [self.qkv.q_size, self.qkv.kv_size, self.qkv.kv_size]

    def forward(
        self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], attn: AttentionBackend
    ) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv(x).split(self.sizes, dim=-1)
        q, k = apply_rotary(
            q.view(t, self.heads, self.head_dim), k.view(t, self.kv_heads, self.head_dim), cos_sin
        )
        v = v.view(t, self.kv_heads, self.head_dim)
        return self.o_proj(attn.forward(self.layer_id, q, k, v))  # type: ignore[no-any-return]


class DeepseekDecoderLayer(PreNormBlock):
    def __init__(self, cfg: DeepseekV2TextConfig, layer_id: int) -> None:
        super().__init__()
        self.self_attn: MLAttention | MHAttention
        self.self_attn = MLAttention(cfg, layer_id) if cfg.use_mla else MHAttention(cfg, layer_id)
        self.mlp: DeepseekMoE | GatedMLP
        if cfg.is_moe_layer(layer_id):
            self.mlp = DeepseekMoE(cfg)
        else:
            self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DeepseekV2Model(DecoderStack):
    def __init__(self, cfg: DeepseekV2TextConfig) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DeepseekDecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = DeepseekRotary(cfg.qk_rope_head_dim if cfg.use_mla else cfg.head_dim, cfg)


def stacked_params_mapping(cfg: DeepseekV2TextConfig) -> list[tuple[str, str, Any]]:
    """(parameter, checkpoint name, shard id) renames of the decoder's fused and stacked
    weights. Experts come first: `.gate_proj.` also matches `experts.{e}.gate_proj.`."""
    out: list[tuple[str, str, Any]] = []
    for e in range(cfg.n_routed_experts or 0):
        out += [
            ("experts.gate_up", f"experts.{e}.gate_proj", (e, 0)),
            ("experts.gate_up", f"experts.{e}.up_proj", (e, 1)),
            ("experts.down", f"experts.{e}.down_proj", (e, 0)),
        ]
    out += [("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1)]
    if not cfg.use_mla:
        out += [("qkv", "q_proj", "q"), ("qkv", "k_proj", "k"), ("qkv", "v_proj", "v")]
    return out


class DeepseekV2ForCausalLM(CausalLMBase):
    """The decoder and LM head (`model.*`, `lm_head.*`) with the runner's geometry."""

    config: DeepseekV2TextConfig
    model: DeepseekV2Model

    def __init__(self, cfg: DeepseekV2TextConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = DeepseekV2Model(cfg)
        self.make_lm_head(cfg.vocab_size, cfg.hidden_size, cfg.tie_word_embeddings)
        self.stacked_params_mapping = stacked_params_mapping(cfg)
        self.set_kv_geometry(cfg.num_heads, cfg.num_kv_heads)
        if cfg.use_mla:  # (MHA keeps the default score scale, head_dim ** -0.5)
            self.num_kv_heads = self.num_heads  # decompressed K/V: one per query head
            self.attention_scale = softmax_scale(cfg)

    def kv_layout(self, *, mla_latent: bool = True) -> KVLayout:
        return kv_layout(self.config, mla_latent=mla_latent, tp=tp_size())


def kv_layout(cfg: DeepseekV2TextConfig, *, mla_latent: bool = True, tp: int = 1) -> KVLayout:
    """The pool's per-token geometry on one of `tp` ranks: MLA's latent row (replicated on
    every rank, as the latent projection is), MLA decompressed (per-head K and padded V of
    this rank's heads), or MHA's K/V."""
    if cfg.use_mla and mla_latent:
        return KVLayout("mla_latent", cfg.num_layers, 1, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    heads = cfg.num_heads if cfg.use_mla else cfg.num_kv_heads
    return KVLayout("kv", cfg.num_layers, max(1, heads // tp), cfg.head_dim)
