"""MiniCPM-V 4.6 (`MiniCPMV4_6ForConditionalGeneration`, transformers' native class): a navit
SigLIP tower with a window-attention merger after layer `insert_layer_id`, an MLP merger and
a Llama-family decoder (see common/families/minicpmv.py for why Qwen3.5 is not served).

Per view (an ImageInput: pixel_values [C, P, L*P], grid [h, w] patches, as in 2.6):
- embeddings: the patch Conv2d plus position embeddings at the patches' fractional
  coordinates (transformers' arange(h) / h bucketing, minicpmv.navit_positions);
- encoder layers 0..insert_layer_id with full attention over the view; then (16x) the
  ViT merger: layer_norm1, attention within each 2x2 window of patches (windows row-major,
  patches row-major inside), the residual added, and each window's four tokens concatenated
  through pre_norm, linear_1, gelu-tanh, linear_2 plus their mean: [h/2 * w/2, vision];
- the remaining layers on that grid, post_layernorm;
- the merger: each 2x2 block concatenated [4 * vision] through LayerNorm, linear_1, GELU,
  linear_2 to the decoder's width: [h/4 * w/4, hidden] (4x mode skips the ViT merger:
  [h/2 * w/2, hidden]).
Every step acts on one view at a time in transformers too, so views of one size are batched.

Checkpoint names (transformers' module tree): `model.language_model.*` -> `model.*`,
`lm_head.*`, `model.vision_tower.*` -> `vision_tower.*` (SiglipVisionTower names plus
`vit_merger.*`; q/k/v fused by the decoder's stacked mapping), `model.merger.mlp.0.*` ->
`merger.*`. Tower and mergers are replicated on every rank except the SigLIP layers' TP split.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fovea.common.messages import ImageInput
from fovea.worker.models.base import EncodesImages
from fovea.worker.models.llama import LlamaForCausalLM
from fovea.worker.models.minicpmv import encode_by_size, navit_embed, navit_positions
from fovea.worker.models.vision.siglip import SiglipAttention, SiglipVisionConfig, SiglipVisionTower


def fold_2x2(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[N, h*w, D] row-major -> [N, h/2 * w/2, 4, D]: each 2x2 block's tokens (row-major
    inside), blocks row-major."""
    n, _, d = x.shape
    x = x.view(n, h // 2, 2, w // 2, 2, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, (h // 2) * (w // 2), 4, d)


class WindowMerger(nn.Module):
    """transformers' MiniCPMV4_6ViTWindowAttentionMerger for 2x2 windows."""

    def __init__(self, cfg: SiglipVisionConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.pre_norm = nn.LayerNorm(4 * d, eps=cfg.layer_norm_eps)
        self.linear_1 = nn.Linear(4 * d, 4 * cfg.intermediate_size)
        self.linear_2 = nn.Linear(4 * cfg.intermediate_size, d)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """[N, h*w, D] -> [N, h/2 * w/2, D]."""
        n, _, d = x.shape
        windows = fold_2x2(x, h, w).reshape(-1, 4, d)  # [N * windows, 4, D]
        windows = windows + self.self_attn(self.layer_norm1(windows))
        mixed = self.linear_1(self.pre_norm(windows.flatten(1)))
        out = self.linear_2(F.gelu(mixed, approximate="tanh")) + windows.mean(dim=1)
        return out.view(n, -1, d)  # type: ignore[no-any-return]


class DownsampleMLP(nn.Module):
    def __init__(self, vision: int, hidden: int) -> None:
        super().__init__()
        self.pre_norm = nn.LayerNorm(4 * vision, eps=1e-6)
        self.linear_1 = nn.Linear(4 * vision, 4 * vision)
        self.linear_2 = nn.Linear(4 * vision, hidden)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """[N, h*w, vision] -> [N, h/2 * w/2, hidden]."""
        x = fold_2x2(x, h, w).flatten(2)
        return self.linear_2(F.gelu(self.linear_1(self.pre_norm(x))))  # type: ignore[no-any-return]


class Merger(nn.Module):
    def __init__(self, vision: int, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.ModuleList([DownsampleMLP(vision, hidden)])  # merger_times = 1


class NavitTower(SiglipVisionTower):
    """SigLIP with the window merger (`vit_merger`) inserted after one layer."""

    def __init__(self, cfg: SiglipVisionConfig) -> None:
        super().__init__(cfg, post_layernorm=True)
        self.vit_merger = WindowMerger(cfg)


class MiniCPMV4_6ForConditionalGeneration(LlamaForCausalLM, EncodesImages):  # type: ignore[misc,unused-ignore]
    checkpoint_prefixes: Sequence[tuple[str, str]] = [
        ("model.language_model.", "model."),
        ("model.vision_tower.", "vision_tower."),
        ("model.merger.", "merger."),
    ]

    def __init__(self, hf_config: dict[str, Any]) -> None:
        text = dict(hf_config["text_config"])
        if text.get("model_type") == "qwen2":
            text["attention_bias"] = True  # Qwen2 always has q/k/v biases
        tied = hf_config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
        text["tie_word_embeddings"] = bool(tied)
        super().__init__({"text_config": text})
        vision = SiglipVisionConfig.from_hf(hf_config["vision_config"])
        self.vision_tower = NavitTower(vision)
        self.merger = Merger(vision.hidden_size, self.config.hidden_size)
        self.patch = vision.patch_size
        self.per_side = vision.image_size // vision.patch_size
        # 16x: the ViT merger folds 2x2 after layer insert_layer_id; 4x: no ViT merger.
        self.insert = int(hf_config.get("insert_layer_id", 6))
        if str(hf_config.get("downsample_mode", "16x")) == "4x":
            self.insert = -1
        self.fold = 4 if self.insert >= 0 else 2  # patches per side folded into one token

    def encode_images(self, images: list[ImageInput]) -> list[torch.Tensor]:
        """Every view -> [h*w / fold², hidden]."""
        for img in images:
            h, w = (int(g) for g in img.grid) if len(img.grid) == 2 else (0, 0)
            if h % self.fold or w % self.fold or not h or not w:
                raise ValueError(f"view grid {list(img.grid)} is not a multiple of {self.fold}")
        return encode_by_size(
            images,
            self.patch,
            lambda h, w: h * w // (self.fold * self.fold),
            self._encode_views,
            self.model.embed_tokens.weight,
        )

    def _encode_views(self, pixels: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """[N, C, P, h*w*P] -> [N, h*w / fold², hidden]."""
        tower = self.vision_tower
        x = navit_embed(tower, pixels, navit_positions(h, w, self.per_side, published=False))
        for i, layer in enumerate(tower.encoder.layers):
            x = layer(x)
            if i == self.insert:
                x = tower.vit_merger(x, h, w)
                h, w = h // 2, w // 2
        assert tower.post_layernorm is not None
        x = tower.post_layernorm(x)
        return self.merger.mlp[0](x, h, w)  # type: ignore[no-any-return]
