"""The Llama 3.2 Vision (Mllama) vision encoder, equal to transformers' `MllamaVisionModel`.

An image arrives as up to `max_num_tiles` tiles (padded here to exactly that many with zero
tiles, as transformers' batch packing does) plus its aspect-ratio id. Per tile: a bias-free
patch Conv2d, a gated aspect-ratio ("pre tile") embedding, a class token, gated positional
embeddings (a shared per-patch table and a per-aspect-ratio per-tile one), layernorm_pre, and
padding of the patches to a multiple of 8. Then the local `transformer` and, after
layernorm_post and a gated "post tile" embedding, the gated `global_transformer` — both attend
over ALL tiles of the image at once. Their mask (transformers'): a key is hidden from a query
only when both are padding (a padding tile, or a padding patch), so real tokens see padding.
The output per tile and patch is the global output concatenated with the local transformer's
outputs at `intermediate_layers_indices` (interleaved: feature d of layer k at d * K + k, as
torch.stack(..., -1).flatten does), [N, tiles, patches, hidden * (1 + K)].

Parameter names follow transformers' `vision_model.*` except the fused `self_attn.qkv_proj`
(q/k/v_proj through the owning model's stacked_params_mapping). The MLP is SigLIP's (fc1/fc2
with bias); attention has no biases and names its output `o_proj`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fovea.common.families.mllama import MllamaGeometry
from fovea.worker.distributed import tp_size
from fovea.worker.layers.linear import QKVParallelLinear, RowParallelLinear
from fovea.worker.models.vision.siglip import ACTIVATIONS, SiglipMLP, SiglipVisionConfig


@dataclass(frozen=True)
class MllamaVisionConfig:
    geometry: MllamaGeometry
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_global_layers: int
    num_heads: int
    num_channels: int
    norm_eps: float
    hidden_act: str
    intermediate_layers: tuple[int, ...]  # indices into the local layers' outputs
    output_dim: int

    @staticmethod
    def from_hf(cfg: dict[str, Any]) -> MllamaVisionConfig:
        """From config.json's dict; transformers' MllamaVisionConfig defaults for missing keys."""
        v = cfg.get("vision_config") or {}
        hidden = int(v.get("hidden_size", 1280))
        layers = int(v.get("num_hidden_layers", 32))
        picks = tuple(int(i) for i in (v.get("intermediate_layers_indices") or [3, 7, 15, 23, 30]))
        if any(not -layers <= i < layers for i in picks):
            raise ValueError(f"intermediate_layers_indices {picks} outside {layers} layers")
        act = str(v.get("hidden_act", "gelu"))
        if act not in ACTIVATIONS:
            raise ValueError(f"Mllama vision hidden_act {act!r} is not supported")
        out = MllamaVisionConfig(
            geometry=MllamaGeometry.from_hf(cfg),
            hidden_size=hidden,
            intermediate_size=int(v.get("intermediate_size", 5120)),
            num_layers=layers,
            num_global_layers=int(v.get("num_global_layers", 8)),
            num_heads=int(v.get("attention_heads", v.get("num_attention_heads", 16))),
            num_channels=int(v.get("num_channels", 3)),
            norm_eps=float(v.get("norm_eps", 1e-5)),
            hidden_act=act,
            intermediate_layers=tuple(i % layers for i in picks),
            output_dim=int(v.get("vision_output_dim", 7680)),
        )
        if out.output_dim != hidden * (1 + len(picks)):
            raise ValueError(
                f"vision_output_dim {out.output_dim} != hidden_size {hidden} x (1 + {len(picks)})"
            )
        return out


class MllamaVisionAttention(nn.Module):
    def __init__(self, cfg: MllamaVisionConfig) -> None:
        super().__init__()
        h, heads = cfg.hidden_size, cfg.num_heads
        if heads % tp_size():
            raise ValueError(f"the vision tower's {heads} heads do not split over tp {tp_size()}")
        self.head_dim = h // heads
        self.qkv_proj = QKVParallelLinear(h, self.head_dim, heads, heads, bias=False)
        self.o_proj = RowParallelLinear(h, h, bias=False)
        self.num_heads = self.qkv_proj.num_heads  # per rank

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [N, L, hidden], mask [N, 1, L, L] bool (True: attend)."""
        n, length, _ = x.shape
        qkv = self.qkv_proj(x).view(n, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [N, heads, L, head_dim] each
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(n, length, -1))  # type: ignore[no-any-return]


class MllamaVisionLayer(nn.Module):
    """Pre-norm attention and MLP; a global layer scales both by tanh of a learned gate."""

    def __init__(self, cfg: MllamaVisionConfig, gated: bool) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.self_attn = MllamaVisionAttention(cfg)
        self.mlp = SiglipMLP(
            SiglipVisionConfig(
                hidden_size=h,
                intermediate_size=cfg.intermediate_size,
                num_hidden_layers=1,
                num_attention_heads=cfg.num_heads,
                image_size=cfg.geometry.tile,
                patch_size=cfg.geometry.patch,
                hidden_act=cfg.hidden_act,
            )
        )
        self.input_layernorm = nn.LayerNorm(h, eps=cfg.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(h, eps=cfg.norm_eps)
        self.gated = gated
        if gated:
            self.gate_attn = nn.Parameter(torch.zeros(1), requires_grad=False)
            self.gate_ffn = nn.Parameter(torch.zeros(1), requires_grad=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), mask)
        x = x + (self.gate_attn.tanh() * h if self.gated else h)
        h = self.mlp(self.post_attention_layernorm(x))
        return x + (self.gate_ffn.tanh() * h if self.gated else h)  # type: ignore[no-any-return]


class MllamaVisionEncoder(nn.Module):
    def __init__(self, cfg: MllamaVisionConfig, num_layers: int, gated: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(MllamaVisionLayer(cfg, gated) for _ in range(num_layers))


class AspectRatioEmbedding(nn.Module):
    """A per-aspect-ratio vector per tile, gated: [N, tiles, P, h] + emb[ar].view(tiles, 1, h)."""

    def __init__(self, cfg: MllamaVisionConfig) -> None:
        super().__init__()
        geo = cfg.geometry
        self.tiles, self.hidden = geo.max_tiles, cfg.hidden_size
        self.embedding = nn.Embedding(len(geo.arrangements) + 1, geo.max_tiles * cfg.hidden_size)
        self.gate = nn.Parameter(torch.zeros(1), requires_grad=False)

    def forward(self, x: torch.Tensor, ar_ids: torch.Tensor) -> torch.Tensor:
        emb: torch.Tensor = self.embedding(ar_ids).view(-1, self.tiles, 1, self.hidden)
        return x + emb * self.gate.tanh()


class GatedPositionalEmbedding(nn.Module):
    """x + (1 - tanh g) * table[P, h] + tanh g * tile_table[ar].view(tiles, P, h)."""

    def __init__(self, cfg: MllamaVisionConfig) -> None:
        super().__init__()
        geo = cfg.geometry
        self.shape = (geo.max_tiles, geo.patches_per_tile, cfg.hidden_size)
        self.gate = nn.Parameter(torch.zeros(1), requires_grad=False)
        self.embedding = nn.Parameter(
            torch.zeros(geo.patches_per_tile, cfg.hidden_size), requires_grad=False
        )
        self.tile_embedding = nn.Embedding(len(geo.arrangements) + 1, math.prod(self.shape))

    def forward(self, x: torch.Tensor, ar_ids: torch.Tensor) -> torch.Tensor:
        gate = self.gate.tanh()
        x = x + (1 - gate) * self.embedding
        tiles: torch.Tensor = self.tile_embedding(ar_ids).view(-1, *self.shape)
        return x + gate * tiles


class MllamaVisionTower(nn.Module):
    def __init__(self, cfg: MllamaVisionConfig) -> None:
        super().__init__()
        self.geometry = geo = cfg.geometry
        h = cfg.hidden_size
        self.hidden = h
        self.picks = cfg.intermediate_layers
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, h, geo.patch, stride=geo.patch, bias=False
        )
        self.class_embedding = nn.Parameter(torch.zeros(h), requires_grad=False)
        self.pre_tile_positional_embedding = AspectRatioEmbedding(cfg)
        self.post_tile_positional_embedding = AspectRatioEmbedding(cfg)
        self.gated_positional_embedding = GatedPositionalEmbedding(cfg)
        self.layernorm_pre = nn.LayerNorm(h)  # eps 1e-5 (nn.LayerNorm's), as transformers
        self.layernorm_post = nn.LayerNorm(h)
        self.transformer = MllamaVisionEncoder(cfg, cfg.num_layers, gated=False)
        self.global_transformer = MllamaVisionEncoder(cfg, cfg.num_global_layers, gated=True)
        self.image_shape = (cfg.num_channels, geo.tile, geo.tile)

    def pack(
        self, tiles: list[np.ndarray], grids: list[list[int]], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images' tiles [n_k, C, S, S] and grids [aspect_ratio_id, n_k] -> pixel_values
        [N, max_tiles, C, S, S] (zero tiles after each image's own), aspect-ratio ids [N] and
        tile masks [N, max_tiles] bool. Raises ValueError for tiles the tower cannot take."""
        geo = self.geometry
        pixels = torch.zeros(len(tiles), geo.max_tiles, *self.image_shape)
        for i, (px, (ar_id, n)) in enumerate(zip(tiles, grids, strict=True)):
            if not 1 <= ar_id <= len(geo.arrangements):
                raise ValueError(f"aspect ratio id {ar_id} outside 1..{len(geo.arrangements)}")
            rows, cols = geo.arrangements[ar_id - 1]
            if tuple(px.shape) != (rows * cols, *self.image_shape) or n != rows * cols:
                raise ValueError(
                    f"image tiles {tuple(px.shape)} (grid {[ar_id, n]}) do not fit a "
                    f"{rows}x{cols} arrangement of {self.image_shape} tiles"
                )
            pixels[i, :n] = torch.from_numpy(px)
        ar_ids = torch.tensor([g[0] for g in grids], dtype=torch.int64)
        valid = torch.arange(geo.max_tiles)[None, :] < torch.tensor([g[1] for g in grids])[:, None]
        return pixels.to(device), ar_ids.to(device), valid.to(device)

    def forward(
        self, pixels: torch.Tensor, ar_ids: torch.Tensor, tile_valid: torch.Tensor
    ) -> torch.Tensor:
        """pixels [N, T, C, S, S] (T = max tiles), ar_ids [N], tile_valid [N, T] bool ->
        [N, T, P, hidden * (1 + K)] (P patches per tile with its class token)."""
        n, t = pixels.shape[:2]
        h = self.hidden
        w = self.patch_embedding.weight
        x = self.patch_embedding(pixels.flatten(0, 1).to(w.dtype))  # [N*T, h, s, s]
        x = x.flatten(2).transpose(1, 2).reshape(n, t, -1, h)  # [N, T, P-1, h]
        x = self.pre_tile_positional_embedding(x, ar_ids)
        x = torch.cat([self.class_embedding.expand(n, t, 1, h), x], dim=2)  # [N, T, P, h]
        x = self.gated_positional_embedding(x, ar_ids)
        x = self.layernorm_pre(x)
        p = x.shape[2]
        pad = -p % 8
        x = F.pad(x, (0, 0, 0, pad))  # [N, T, Pp, h], Pp = P + pad
        pp = p + pad
        # [N, T*Pp]: padding tiles and padding patches; two padding tokens never meet.
        padding = (~tile_valid)[:, :, None] | (torch.arange(pp, device=x.device) >= p)
        padding = padding.reshape(n, t * pp)
        mask = ~(padding[:, :, None] & padding[:, None, :])[:, None]  # [N, 1, L, L]
        x = x.reshape(n, t * pp, h)
        kept: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.transformer.layers):
            x = layer(x, mask)
            if i in self.picks:
                kept[i] = x
        x = self.layernorm_post(x).view(n, t, pp, h)
        x = self.post_tile_positional_embedding(x, ar_ids).reshape(n, t * pp, h)
        for layer in self.global_transformer.layers:
            x = layer(x, mask)
        inter = torch.stack([kept[i] for i in self.picks], dim=-1)  # [N, L, h, K]
        inter = inter.reshape(n, t, pp, -1)[:, :, :p]
        return torch.cat([x.view(n, t, pp, h)[:, :, :p], inter], dim=-1)
