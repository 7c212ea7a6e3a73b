"""Llama 3.2 Vision (`MllamaForConditionalGeneration`): a Llama decoder with gated
cross-attention layers interleaved among its self-attention layers, reading images through
them (the `<|image|>` token is an ordinary token, one per image, never replaced).

- Self-attention layers are Llama's (llama.py), numbered among themselves for the KV pool
  (`config.num_layers` counts only them): cross-attention layers take no token KV slots.
- A cross-attention layer (layer index in `cross_attention_layers`): queries from the text,
  keys/values from an image's projected vision states (computed once per sequence into the
  worker's image-slot pool, worker/cross_attention.py), q and k RMS-normed per head, no rope;
  out and MLP each added with a tanh gate. Which images a token sees, and the MLP row mask of
  tokens before the first image, come from the step's `CrossBatch`. With no image in the
  batch the layers are skipped, as transformers skips them for a text-only request.
- The vision tower (vision/mllama.py) and `multi_modal_projector` (vision_output_dim ->
  hidden) make, per image, [max_tiles * patches, hidden] states (`encode_images`);
  `cross_kv` projects them to every cross layer's K/V.

Checkpoints: transformers 5 saves (and the hub has) `language_model.model.*`,
`language_model.lm_head.*`, `vision_model.*`, `multi_modal_projector.*`; the v5 module tree
is `model.language_model.*`, `model.vision_model.*`, `model.multi_modal_projector.*`,
`lm_head.*`. Both map through `checkpoint_prefixes`; text rope from `rope_parameters` (v5) or
`rope_theta` + `rope_scaling` (older configs). The embedding has vocab_size + 8 rows (the
image token is id vocab_size); the head has vocab_size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from fovea.common.messages import ImageInput
from fovea.worker.attention.base import AttentionBackend
from fovea.worker.distributed import tp_rank, tp_size
from fovea.worker.layers.embedding import VocabParallelEmbedding
from fovea.worker.layers.linear import (
    ColumnParallelLinear,
    Loaded,
    RowParallelLinear,
    _ParallelLinear,
    copy_checked,
    narrow_loaded,
)
from fovea.worker.layers.norm import RMSNorm
from fovea.worker.layers.rotary import RotaryEmbedding
from fovea.worker.models.base import CausalLMBase, CrossAttentionImages
from fovea.worker.models.llama import DecoderConfig, LlamaDecoderLayer, LlamaMLP
from fovea.worker.models.vision.mllama import MllamaVisionConfig, MllamaVisionTower

if TYPE_CHECKING:
    from fovea.worker.cross_attention import CrossBatch

EXTRA_EMBEDDINGS = 8  # rows past vocab_size in the embedding (the image token's among them)


class KVHeadsLinear(_ParallelLinear):
    """A k or v projection split by KV heads across ranks, or replicated (one head per rank,
    the one its query heads use) when tp_size > num_kv_heads, as QKVParallelLinear does."""

    def __init__(self, hidden: int, head_dim: int, num_kv_heads: int) -> None:
        tp = tp_size()
        if tp >= num_kv_heads:
            if tp % num_kv_heads:
                raise ValueError(f"tp size {tp} is not a multiple of {num_kv_heads} KV heads")
            self.num_kv_heads, self.head_start = 1, tp_rank() * num_kv_heads // tp
        else:
            if num_kv_heads % tp:
                raise ValueError(f"{num_kv_heads} KV heads do not split over tp size {tp}")
            self.num_kv_heads = num_kv_heads // tp
            self.head_start = tp_rank() * self.num_kv_heads
        self.head_dim = head_dim
        super().__init__(hidden, self.num_kv_heads * head_dim, bias=False)

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id: Any = None) -> None:
        rows = self.num_kv_heads * self.head_dim
        part = narrow_loaded(loaded, 0, self.head_start * self.head_dim, rows)
        copy_checked(param, part, "cross-attention k/v weight")


class MllamaCrossAttention(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        hd = cfg.head_dim
        self.q_proj = ColumnParallelLinear(cfg.hidden_size, cfg.num_heads * hd)
        self.k_proj = KVHeadsLinear(cfg.hidden_size, hd, cfg.num_kv_heads)
        self.v_proj = KVHeadsLinear(cfg.hidden_size, hd, cfg.num_kv_heads)
        self.o_proj = RowParallelLinear(cfg.num_heads * hd, cfg.hidden_size)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.num_heads, self.head_dim = cfg.num_heads // tp_size(), hd  # per rank
        self.num_kv_heads = self.k_proj.num_kv_heads

    def kv(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """states [..., n, hidden] -> k (normed), v [..., n, kv_heads, head_dim]."""
        shape = (*states.shape[:-1], self.num_kv_heads, self.head_dim)
        k = self.k_norm(self.k_proj(states).view(shape))[0]
        return k, self.v_proj(states).view(shape)


class MllamaCrossAttentionDecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig, cross_id: int) -> None:
        super().__init__()
        self.cross_id = cross_id  # index among the cross-attention layers (the pool's axis)
        self.cross_attn = MllamaCrossAttention(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)
        self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1), requires_grad=False)
        self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1), requires_grad=False)

    def forward(self, x: torch.Tensor, cross: CrossBatch) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]; rows of sequences without images pass unchanged."""
        h = x if cross.rows is None else x.index_select(0, cross.rows)  # [R, hidden]
        attn = self.cross_attn
        q = attn.q_proj(self.input_layernorm(h)[0]).view(-1, attn.num_heads, attn.head_dim)
        out: torch.Tensor = attn.o_proj(cross.attend(self.cross_id, attn.q_norm(q)[0]))
        h = h + self.cross_attn_attn_gate.tanh() * out
        # Rows before a sequence's first image get no MLP contribution (row_mask 0).
        mlp: torch.Tensor = self.mlp(self.post_attention_layernorm(h)[0]) * cross.row_mask
        h = h + self.cross_attn_mlp_gate.tanh() * mlp
        if cross.rows is None:
            return h
        return x.index_copy(0, cross.rows, h)


class MllamaTextModel(nn.Module):
    def __init__(self, cfg: DecoderConfig, cross_layers: tuple[int, ...], total: int) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(
            cfg.vocab_size + EXTRA_EMBEDDINGS, cfg.hidden_size
        )
        layers: list[nn.Module] = []
        for i in range(total):
            if i in cross_layers:
                layers.append(MllamaCrossAttentionDecoderLayer(cfg, cross_layers.index(i)))
            else:  # numbered among the self-attention layers: its KV pool layer
                layers.append(LlamaDecoderLayer(cfg, i - sum(c < i for c in cross_layers)))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(
            cfg.head_dim, cfg.max_positions, cfg.rope_theta, cfg.rope_scaling
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionBackend,
        cross: CrossBatch | None,
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [T, hidden]
        residual: torch.Tensor | None = None
        cos_sin = self.rotary.cos_sin(positions, x.dtype)
        for layer in self.layers:
            if isinstance(layer, MllamaCrossAttentionDecoderLayer):
                if cross is None:
                    continue  # no image in the batch: skipped, as transformers does
                x = x if residual is None else x + residual
                x, residual = layer(x, cross), None
            else:
                x, residual = layer(x, residual, cos_sin, attn)
        out: torch.Tensor = self.norm(x, residual)[0]
        return out


class MllamaForConditionalGeneration(CausalLMBase, CrossAttentionImages):
    """The runner keeps per-sequence image K/V for the cross-attention layers
    (worker/cross_attention.py) instead of merging image embeddings into the prompt."""

    checkpoint_prefixes: Sequence[tuple[str, str]] = [
        ("language_model.model.", "model."),
        ("language_model.lm_head.", "lm_head."),
        ("model.language_model.", "model."),
        ("model.vision_model.", "vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
    ]
    # (fused parameter, checkpoint name, shard id). The cross-attention projections stay
    # separate (q reads text, k/v read image states): their identity entries come first, so
    # the generic q/k/v -> qkv_proj entries never rename them.
    stacked_params_mapping: Sequence[tuple[str, str, str | int | None]] = [
        ("cross_attn.q_proj", "cross_attn.q_proj", None),
        ("cross_attn.k_proj", "cross_attn.k_proj", None),
        ("cross_attn.v_proj", "cross_attn.v_proj", None),
        ("qkv_proj", "q_proj", "q"),
        ("qkv_proj", "k_proj", "k"),
        ("qkv_proj", "v_proj", "v"),
        ("gate_up_proj", "gate_proj", 0),
        ("gate_up_proj", "up_proj", 1),
    ]
    skip_weight_suffixes: tuple[str, ...] = ("rotary_emb.inv_freq",)
    config: DecoderConfig
    model: MllamaTextModel

    def __init__(self, hf_config: dict[str, Any]) -> None:
        super().__init__()
        text = hf_config.get("text_config")
        if not isinstance(text, dict):
            raise ValueError("an Mllama config.json needs a text_config")
        full = DecoderConfig.from_hf(hf_config)
        if full.attention_bias or full.mlp_bias:
            raise ValueError("Mllama with attention or MLP biases is not supported")
        cross = tuple(
            int(i) for i in text.get("cross_attention_layers", [3, 8, 13, 18, 23, 28, 33, 38])
        )
        if len(set(cross)) != len(cross) or any(not 0 <= i < full.num_layers for i in cross):
            raise ValueError(f"cross_attention_layers {list(cross)} do not fit {full.num_layers}")
        self.cross_layers = tuple(sorted(cross))
        # num_layers counts the self-attention layers only: the KV pool's layers.
        self.config = cfg = dataclasses.replace(full, num_layers=full.num_layers - len(cross))
        self.model = MllamaTextModel(cfg, self.cross_layers, full.num_layers)
        self.make_lm_head(cfg.vocab_size, cfg.hidden_size, tied=False)
        if cfg.tie_word_embeddings:
            raise ValueError("Mllama with tied word embeddings is not supported")
        vision = MllamaVisionConfig.from_hf(hf_config)
        self.geometry = vision.geometry
        self.vision_model = MllamaVisionTower(vision)
        self.multi_modal_projector = nn.Linear(vision.output_dim, cfg.hidden_size, bias=True)
        self.set_kv_geometry(cfg.num_heads, cfg.num_kv_heads)

    @property
    def num_cross_layers(self) -> int:
        return len(self.cross_layers)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionBackend,
        input_embeds: torch.Tensor | None = None,
        cross: CrossBatch | None = None,
    ) -> torch.Tensor:
        """input_ids [T], positions [T] -> final hidden states [T, hidden]. `cross`: the
        step's cross-attention plan (None when no sequence in the batch has images)."""
        if input_embeds is not None:
            raise ValueError("Mllama takes token ids; images enter through cross-attention")
        out: torch.Tensor = self.model(input_ids, positions, attn, cross)
        return out

    def encode_images(self, images: list[ImageInput]) -> list[torch.Tensor]:
        """One tower call over all images -> per image [max_tiles * patches, hidden]: the
        projected states of every tile slot (padding tiles included: tokens before the
        first image attend to them, as in transformers)."""
        weight = self.multi_modal_projector.weight
        pixels, ar_ids, valid = self.vision_model.pack(
            [np.asarray(img.pixel_values) for img in images],
            [list(img.grid) for img in images],
            weight.device,
        )
        feats = self.vision_model(pixels.to(weight.dtype), ar_ids, valid)  # [N, T, P, out]
        states = self.multi_modal_projector(feats).flatten(1, 2)  # [N, T * P, hidden]
        return list(states.unbind(0))

    def cross_kv(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """states [n, tokens, hidden] -> k, v [cross layers, n, tokens, kv_heads, head_dim]."""
        ks, vs = [], []
        for i in self.cross_layers:
            layer = self.model.layers[i]
            assert isinstance(layer, MllamaCrossAttentionDecoderLayer)
            k, v = layer.cross_attn.kv(states)
            ks.append(k)
            vs.append(v)
        return torch.stack(ks), torch.stack(vs)
