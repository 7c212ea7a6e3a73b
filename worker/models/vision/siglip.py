"""SigLIP vision tower (the encoder of transformers' `SiglipVisionModel`), shared by the
families that put one in front of their decoder (Gemma 3, LLaVA-OneVision, PaliGemma, ...).

Parameter names equal `SiglipVisionModel.vision_model.*` (`embeddings.patch_embedding`, a
Conv2d; `embeddings.position_embedding`; `encoder.layers.{i}.{layer_norm1, self_attn.*,
layer_norm2, mlp.fc1, mlp.fc2}`; `post_layernorm`) except one: q/k/v_proj are fused into
`self_attn.qkv_proj`, loaded through `stacked_params_mapping`. The loader applies a model's
mapping to every checkpoint name, and every Fovea decoder maps `.q_proj.` -> `.qkv_proj.`, so a
separate q_proj here could never be filled inside a VLM; a model that owns this tower must
include these three entries (a Llama-style mapping already does). The model maps its
checkpoint prefix (e.g. `vision_tower.vision_model.`) onto wherever it keeps the tower.
No attention-pooling head: VLMs use the patch features.

Tensor parallel: attention heads and the MLP's hidden width are split across ranks
(column-parallel qkv and fc1, row-parallel out_proj and fc2, which all-reduce); every rank
sees every patch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fovea.worker.distributed import tp_size
from fovea.worker.layers.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


@dataclass(frozen=True)
class SiglipVisionConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @staticmethod
    def from_hf(d: dict[str, Any]) -> SiglipVisionConfig:
        """A `vision_config` dict; missing keys take transformers' SiglipVisionConfig defaults
        (older checkpoints saved only the fields that differ from them)."""
        act = str(d.get("hidden_act", "gelu_pytorch_tanh"))
        if act not in ACTIVATIONS:
            raise ValueError(f"SigLIP hidden_act {act!r} is not supported")
        cfg = SiglipVisionConfig(
            hidden_size=int(d.get("hidden_size", 768)),
            intermediate_size=int(d.get("intermediate_size", 3072)),
            num_hidden_layers=int(d.get("num_hidden_layers", 12)),
            num_attention_heads=int(d.get("num_attention_heads", 12)),
            image_size=int(d.get("image_size", 224)),
            patch_size=int(d.get("patch_size", 16)),
            num_channels=int(d.get("num_channels", 3)),
            layer_norm_eps=float(d.get("layer_norm_eps", 1e-6)),
            hidden_act=act,
        )
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError("SigLIP hidden_size is not divisible by num_attention_heads")
        return cfg


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: SiglipVisionConfig) -> None:
        super().__init__()
        # stride = kernel: one output position per non-overlapping patch.
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size
        )
        self.position_embedding = nn.Embedding(cfg.num_patches, cfg.hidden_size)
        self.num_patches = cfg.num_patches

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, patches, hidden]; patches row-major over the image. The images
        must be image_size square (no position interpolation)."""
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        x = x.flatten(2).transpose(1, 2)  # [N, patches, hidden]
        if x.shape[1] != self.num_patches:
            raise ValueError(
                f"image of {tuple(pixel_values.shape[-2:])} pixels gives {x.shape[1]} patches, "
                f"the tower has {self.num_patches} positions"
            )
        return x + self.position_embedding.weight  # type: ignore[no-any-return]


class SiglipAttention(nn.Module):
    def __init__(self, cfg: SiglipVisionConfig) -> None:
        super().__init__()
        h, heads = cfg.hidden_size, cfg.num_attention_heads
        if heads % tp_size():
            raise ValueError(f"SigLIP's {heads} attention heads do not split over tp {tp_size()}")
        self.qkv_proj = QKVParallelLinear(h, cfg.head_dim, heads, heads, bias=True)
        self.out_proj = RowParallelLinear(h, h, bias=True)
        self.num_heads, self.head_dim = self.qkv_proj.num_heads, cfg.head_dim  # per rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, P, hidden]: full (bidirectional) attention among the patches of each image."""
        n, p, _ = x.shape
        qkv = self.qkv_proj(x).view(n, p, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [N, heads_per_rank, P, head_dim] each
        out = F.scaled_dot_product_attention(q, k, v)  # scale head_dim ** -0.5, as HF
        return self.out_proj(out.transpose(1, 2).reshape(n, p, -1))  # type: ignore[no-any-return]


class SiglipMLP(nn.Module):
    def __init__(self, cfg: SiglipVisionConfig) -> None:
        super().__init__()
        self.fc1 = ColumnParallelLinear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.fc2 = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, bias=True)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))  # type: ignore[no-any-return]


class SiglipEncoderLayer(nn.Module):
    def __init__(self, cfg: SiglipVisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))  # type: ignore[no-any-return]


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: SiglipVisionConfig, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(cfg) for _ in range(num_layers))


class SiglipVisionTower(nn.Module):
    """The embeddings, the first `num_layers` encoder layers (default all) and, if asked, the
    post-layernorm. A checkpoint's weights of layers not built (a VLM that takes an earlier
    layer's features) must be skipped by the model that owns the tower."""

    # Loading the tower on its own (worker/models/base.py DeclaresWeightNames): (fused
    # parameter, checkpoint name, shard id); names need no prefix renamed, none skipped.
    stacked_params_mapping: ClassVar[list[tuple[str, str, str | int]]] = [
        ("qkv_proj", "q_proj", "q"),
        ("qkv_proj", "k_proj", "k"),
        ("qkv_proj", "v_proj", "v"),
    ]
    checkpoint_prefixes: ClassVar[tuple[tuple[str, str], ...]] = ()
    skip_weight_suffixes: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        cfg: SiglipVisionConfig,
        *,
        num_layers: int | None = None,
        post_layernorm: bool = True,
    ) -> None:
        super().__init__()
        n = cfg.num_hidden_layers if num_layers is None else num_layers
        if not 0 <= n <= cfg.num_hidden_layers:
            raise ValueError(f"num_layers {n} not in [0, {cfg.num_hidden_layers}]")
        self.cfg = cfg
        self.embeddings = SiglipEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg, n)
        self.post_layernorm = (
            nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) if post_layernorm else None
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, patches, hidden]."""
        x: torch.Tensor = self.embeddings(pixel_values)
        for layer in self.encoder.layers:
            x = layer(x)
        if self.post_layernorm is not None:
            x = self.post_layernorm(x)
        return x
