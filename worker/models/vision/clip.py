"""CLIP vision tower (the encoder of transformers' `CLIPVisionModel`), as LLaVA uses it: the
hidden state after a chosen layer, so only the layers up to it are built.

Parameter names equal `CLIPVisionModel.vision_model.*` (`embeddings.class_embedding`,
`embeddings.patch_embedding` (Conv2d, no bias), `embeddings.position_embedding`, `pre_layrnorm`,
`encoder.layers.{i}.*`, `post_layernorm`), except q/k/v_proj fused into `self_attn.qkv_proj`
(the owner's `stacked_params_mapping` loads them, as for SigLIP). The encoder layer is
SigLIP's: both are pre-norm blocks with the same names and full attention; they differ only in
activation and epsilon, which the config carries. The checkpoint's weights of layers not built
and of an unused post-layernorm are listed by `unused_weight_suffixes` for the owner to skip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fovea.worker.models.vision.siglip import SiglipEncoder, SiglipVisionConfig

# The tensors of one encoder layer, as checkpoints name them (q/k/v unfused).
LAYER_TENSORS = tuple(
    f"{module}.{kind}"
    for module in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.out_proj",
        "layer_norm1",
        "layer_norm2",
        "mlp.fc1",
        "mlp.fc2",
    )
    for kind in ("weight", "bias")
)


@dataclass(frozen=True)
class ClipVisionConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @staticmethod
    def from_hf(d: dict[str, Any]) -> ClipVisionConfig:
        """A complete `vision_config` dict (model_type clip_vision_model)."""
        return ClipVisionConfig(
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=int(d["num_attention_heads"]),
            image_size=int(d["image_size"]),
            patch_size=int(d["patch_size"]),
            num_channels=int(d.get("num_channels", 3)),
            layer_norm_eps=float(d.get("layer_norm_eps", 1e-5)),
            hidden_act=str(d.get("hidden_act", "quick_gelu")),
        )

    def as_siglip(self) -> SiglipVisionConfig:
        """The same block geometry, for SigLIP's encoder layer."""
        return SiglipVisionConfig(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            image_size=self.image_size,
            patch_size=self.patch_size,
            num_channels=self.num_channels,
            layer_norm_eps=self.layer_norm_eps,
            hidden_act=self.hidden_act,
        )


class ClipEmbeddings(nn.Module):
    def __init__(self, cfg: ClipVisionConfig) -> None:
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size), requires_grad=False)
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size, bias=False
        )
        # Position 0 is the class token's, then the patches row-major.
        self.position_embedding = nn.Embedding(cfg.num_patches + 1, cfg.hidden_size)
        self.image_size = cfg.image_size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] (H = W = image_size: no position interpolation) -> [N, 1 + P, hidden]."""
        if tuple(pixel_values.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"image of {tuple(pixel_values.shape[-2:])} pixels; the tower takes "
                f"{self.image_size}x{self.image_size}"
            )
        weight = self.patch_embedding.weight
        x = self.patch_embedding(pixel_values.to(weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat((cls, x), dim=1) + self.position_embedding.weight


class ClipVisionTower(nn.Module):
    """Embeddings, pre-layernorm and the first `num_layers` encoder layers.
    `hidden_states(pixels, wanted)` returns transformers' `hidden_states[i]` for each wanted
    index i (0 = after pre_layrnorm, i = after layer i). The post-layernorm is never built:
    CLIP applies it to the pooled CLS output only, which LLaVA does not use."""

    def __init__(self, cfg: ClipVisionConfig, *, num_layers: int | None = None) -> None:
        super().__init__()
        n = cfg.num_hidden_layers if num_layers is None else num_layers
        if not 0 <= n <= cfg.num_hidden_layers:
            raise ValueError(f"num_layers {n} not in [0, {cfg.num_hidden_layers}]")
        self.cfg = cfg
        self.embeddings = ClipEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = SiglipEncoder(cfg.as_siglip(), n)

    def unused_weight_suffixes(self) -> tuple[str, ...]:
        """Checkpoint tensor suffixes this tower does not build: later layers, the
        post-layernorm, an older checkpoint's position_ids buffer."""
        built = len(self.encoder.layers)
        later = [
            f".encoder.layers.{i}.{t}"
            for i in range(built, self.cfg.num_hidden_layers)
            for t in LAYER_TENSORS
        ]
        return (*later, ".post_layernorm.weight", ".post_layernorm.bias", ".position_ids")

    def hidden_states(self, pixel_values: torch.Tensor, wanted: list[int]) -> list[torch.Tensor]:
        """[N, C, H, W] -> [N, 1 + P, hidden] for each index in `wanted` (each in
        [0, layers built])."""
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        states = {0: x} if 0 in wanted else {}
        for i, layer in enumerate(self.encoder.layers, 1):
            x = layer(x)
            if i in wanted:
                states[i] = x
        return [states[i] for i in wanted]
