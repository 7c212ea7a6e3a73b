"""MiniCPM-V 2.6 (`MiniCPMV`, the hub's remote-code layout): a variable-resolution ("navit")
SigLIP tower, a perceiver resampler with a 2-D sin-cos position embedding and a Qwen2 decoder.
The navit pieces here are shared with the 4.6 layout (minicpmv4_6.py).

Each placeholder run of the prompt (an image's global view or one slice, see
tokenizer_service/processors/minicpmv.py) is one ImageInput: pixel_values [C, P, L*P] (the L
patches side by side) and grid [h, w] patches, L = h * w. The tower embeds the patches (a
Conv2d of stride P over that strip), adds position embeddings looked up at the view's
fractional patch coordinates bucketed onto the tower's image_size/P grid, runs every encoder
layer (full attention within the view) and the post-layernorm. The resampler's query_num
learned queries then cross-attend to the view's features (+ the sin-cos embedding of each
patch's (row, column)) in one multi-head attention of hidden_size // 128 heads, followed by a
layernorm and a projection: [query_num, hidden] per view, placed on its `<unk>` run.
Views of equal size are encoded together; transformers' remote code pads them into one batch
with masks, which gives the same values.

Checkpoint names: `llm.model.*` / `llm.lm_head.*` (the decoder, as Qwen2ForCausalLM),
`vpm.*` (SiglipVisionTower's names, q/k/v fused by the decoder's stacked mapping),
`resampler.{query, kv_proj, attn.in_proj_*, attn.out_proj, ln_q, ln_kv, ln_post, proj}`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fovea.common.families.minicpmv import RESAMPLER_HEAD_DIM
from fovea.common.messages import ImageInput
from fovea.worker.models.base import EncodesImages
from fovea.worker.models.llava import _SIGLIP_HEAD
from fovea.worker.models.qwen2 import Qwen2ForCausalLM
from fovea.worker.models.vision.clip import LAYER_TENSORS
from fovea.worker.models.vision.siglip import SiglipVisionConfig, SiglipVisionTower

# SigLIP's attention-pooling head and position-id buffer, should a checkpoint carry them.
TOWER_UNUSED = (*(f"vpm{name}" for name in _SIGLIP_HEAD), "vpm.embeddings.position_ids")


def navit_positions(h: int, w: int, per_side: int, published: bool) -> torch.Tensor:
    """[h * w] int64 indices into the tower's per_side² position table: each patch's
    fractional (row, column) bucketed onto the table's grid. published=True computes the
    fractions as the 2.6 remote code does (arange with a float32 step of 1/h), False as
    transformers 4.6 does (arange(h) / h); bucket edges can differ between the two."""
    f32 = torch.float32
    edges = torch.arange(1 / per_side, 1.0, 1 / per_side, dtype=f32)
    coords = []
    for n in (h, w):
        if published:  # the step is 1 / (an int32 tgt_size): a float32 value
            step = (torch.ones((), dtype=f32) / n).item()
            coords.append(torch.arange(0, 1 - 1e-6, step, dtype=f32))
        else:
            coords.append(torch.arange(n, dtype=f32) / n)
    rows, cols = (torch.bucketize(c, edges, right=True) for c in coords)
    return (rows[:, None] * per_side + cols).flatten()


def navit_embed(
    tower: SiglipVisionTower, pixels: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """pixels [N, C, P, L*P] (views of one size), positions [L] -> [N, L, hidden]."""
    emb = tower.embeddings
    x = emb.patch_embedding(pixels.to(emb.patch_embedding.weight.dtype))  # [N, hidden, 1, L]
    x = x.flatten(2).transpose(1, 2)
    return x + emb.position_embedding(positions.to(x.device))  # type: ignore[no-any-return]


def encode_by_size(
    images: list[ImageInput],
    patch: int,
    tokens: Callable[[int, int], int],
    encode: Callable[[torch.Tensor, int, int], torch.Tensor],
    like: torch.Tensor,
) -> list[torch.Tensor]:
    """Check each view's pixels against its grid and token count, encode the views of each
    [h, w] together with encode(pixels [N, C, P, L*P], h, w) -> [N, tokens, hidden], return
    each view's rows in input order. `like` gives device and dtype."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(images):
        if len(img.grid) != 2:
            raise ValueError(f"a MiniCPM-V view has grid [h, w], got {list(img.grid)}")
        h, w = (int(g) for g in img.grid)
        shape = tuple(img.pixel_values.shape)
        if len(shape) != 3 or shape[1:] != (patch, h * w * patch):
            raise ValueError(f"view pixel_values {shape} do not fit its [{h}, {w}] patch grid")
        if img.num_tokens != tokens(h, w):
            raise ValueError(
                f"a [{h}, {w}] view takes {tokens(h, w)} tokens, the prompt has {img.num_tokens}"
            )
        groups.setdefault((h, w), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(images)
    for (h, w), idx in groups.items():
        pixels = torch.from_numpy(np.stack([images[i].pixel_values for i in idx]))
        feats = encode(pixels.to(like.device, like.dtype), h, w).to(like.dtype)
        for j, i in enumerate(idx):
            out[i] = feats[j]
    return [t for t in out if t is not None]


@lru_cache(maxsize=64)
def sincos_2d(dim: int, h: int, w: int) -> torch.Tensor:
    """[h * w, dim] float32, the published numpy computation: for patch (i, j), the 1-D
    sin-cos embeddings (dim / 2 each: sines then cosines, frequencies 10000^(-k / (dim/4)))
    of j, then of i (the published grid lists the column first)."""
    omega = np.arange(dim // 4, dtype=np.float32)
    omega /= dim / 4.0
    omega = 1.0 / 10000**omega  # [dim / 4]
    cols, rows = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))

    def one_d(pos: np.ndarray) -> np.ndarray:
        out = np.einsum("hw,d->hwd", pos, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=-1)

    emb = np.concatenate([one_d(cols), one_d(rows)], axis=-1)  # [h, w, dim]
    return torch.from_numpy(emb.reshape(h * w, dim)).float()


class ResamplerAttention(nn.Module):
    """nn.MultiheadAttention's parameters: in_proj [3 * dim, dim] (q, k, v stacked), out_proj."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim), requires_grad=False)
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim), requires_grad=False)
        self.out_proj = nn.Linear(dim, dim)


class Resampler(nn.Module):
    """query_num queries cross-attend to a view's features in one multi-head attention
    (nn.MultiheadAttention's parameter names; keys get the 2-D position embedding, values
    do not). Replicated on every rank."""

    def __init__(self, queries: int, dim: int, heads: int, kv_dim: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.empty(queries, dim), requires_grad=False)
        self.kv_proj: nn.Linear | None = None
        if kv_dim != dim:
            self.kv_proj = nn.Linear(kv_dim, dim, bias=False)
        self.attn = ResamplerAttention(dim)
        self.ln_q = nn.LayerNorm(dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(dim, eps=1e-6)
        self.ln_post = nn.LayerNorm(dim, eps=1e-6)
        self.proj = nn.Parameter(torch.empty(dim, dim), requires_grad=False)
        self.heads, self.dim = heads, dim

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """x [N, L, kv_dim] (views of one size), pos [L, dim] -> [N, queries, dim]."""
        n, length, _ = x.shape
        if self.kv_proj is not None:
            x = self.kv_proj(x)
        x = self.ln_kv(x)  # [N, L, dim]
        wq, wk, wv = self.attn.in_proj_weight.chunk(3)
        bq, bk, bv = self.attn.in_proj_bias.chunk(3)
        heads, hd = self.heads, self.dim // self.heads
        q = F.linear(self.ln_q(self.query), wq, bq)  # [Q, dim]
        q = q.view(1, -1, heads, hd).transpose(1, 2).expand(n, -1, -1, -1)  # [N, heads, Q, hd]
        k = F.linear(x + pos.to(x.dtype), wk, bk).view(n, length, heads, hd).transpose(1, 2)
        v = F.linear(x, wv, bv).view(n, length, heads, hd).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # [N, heads, Q, hd]
        out = self.attn.out_proj(out.transpose(1, 2).reshape(n, -1, self.dim))
        return self.ln_post(out) @ self.proj  # type: ignore[no-any-return]


class MiniCPMV(Qwen2ForCausalLM, EncodesImages):  # type: ignore[misc,unused-ignore]
    checkpoint_prefixes: Sequence[tuple[str, str]] = [
        ("llm.model.", "model."),
        ("llm.lm_head.", "lm_head."),
    ]

    def __init__(self, hf_config: dict[str, Any]) -> None:
        super().__init__(hf_config)  # the decoder: Qwen2's fields at the top level
        vision = SiglipVisionConfig.from_hf(hf_config["vision_config"])
        depth = vision.num_hidden_layers - int(bool(hf_config.get("drop_vision_last_layer")))
        self.vpm = SiglipVisionTower(vision, num_layers=depth, post_layernorm=True)
        hidden = self.config.hidden_size
        self.query_num = int(hf_config.get("query_num", 64))
        self.resampler = Resampler(
            self.query_num, hidden, hidden // RESAMPLER_HEAD_DIM, vision.hidden_size
        )
        self.patch = vision.patch_size
        self.per_side = vision.image_size // vision.patch_size
        # drop_vision_last_layer: a checkpoint that still holds the last layer skips it.
        dropped = [f"vpm.encoder.layers.{depth}.{t}" for t in LAYER_TENSORS]
        skip = (*Qwen2ForCausalLM.skip_weight_suffixes, *TOWER_UNUSED, *dropped)
        self.skip_weight_suffixes = skip

    def encode_images(self, images: list[ImageInput]) -> list[torch.Tensor]:
        """Every view -> [query_num, hidden]."""
        return encode_by_size(
            images,
            self.patch,
            lambda h, w: self.query_num,
            self._encode_views,
            self.model.embed_tokens.weight,
        )

    def _encode_views(self, pixels: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """[N, C, P, h*w*P] -> [N, query_num, hidden]."""
        positions = navit_positions(h, w, self.per_side, published=True)
        x = navit_embed(self.vpm, pixels, positions)
        for layer in self.vpm.encoder.layers:
            x = layer(x)
        assert self.vpm.post_layernorm is not None
        x = self.vpm.post_layernorm(x)
        pos = sincos_2d(self.config.hidden_size, h, w).to(x.device)
        return self.resampler(x, pos)  # type: ignore[no-any-return]
