"""DeepSeek-VL2 (`DeepseekVLV2ForCausalLM`): a SigLIP ViT (all `layers` blocks and the final
LayerNorm, as timm's forward_features) encodes the global view and the local tiles of each
image; the projector concatenates each 2x2 block of patch features (the patch grid zero-padded
to even first) and runs an MLP (Linear, then GELU + Linear per extra depth); the image's
embeddings are then laid out as DeepSeek-VL2 does with tile_tag "2D": the global view's
rows each followed by `image_newline`, `view_seperator` (sic), then the local tiles stitched
into one grid whose rows each end in `image_newline` (global_view_pos "tail": local tiles
first). The decoder is DeepSeek-V2 (deepseek_v2.py).

Checkpoint names: `vision.*` in timm's layout (patch_embed.proj, pos_embed [1, P, width],
blocks.{i}.{norm1, attn.qkv (fused q;k;v rows), attn.proj, norm2, mlp.fc1, mlp.fc2}, norm;
the attention-pooling head attn_pool.* is unused), `projector.layers.{0,2,..}.*`,
`image_newline`, `view_seperator`, `language.model.*`, `language.lm_head.*`. They land on
the shared SigLIP tower (`vision_tower.*`, vision/siglip.py), `projector.*`, and the decoder's
`model.*` / `lm_head.*`.

Tensor parallel: the tower and decoder split as theirs do; the projector (a few MB) and the
two embeddings are replicated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fovea.common.families.deepseek_vl2 import DeepseekVL2Spec, deepseek_vl2_spec
from fovea.common.messages import ImageInput
from fovea.worker.layers.linear import (
    Loaded,
    copy_checked,
    narrow_loaded,
    read_full,
    set_weight_loader,
)
from fovea.worker.models.base import EncodesImages
from fovea.worker.models.deepseek_v2 import DeepseekV2ForCausalLM
from fovea.worker.models.vision.siglip import SiglipAttention, SiglipVisionConfig, SiglipVisionTower

_ATTN_POOL = tuple(
    f"vision.attn_pool.{name}"
    for name in (
        "latent", "q.weight", "q.bias", "kv.weight", "kv.bias", "proj.weight", "proj.bias",
        "norm.weight", "norm.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
        "mlp.fc2.bias",
    )
)  # fmt: skip


class DownsampleProjector(nn.Module):
    """[N, P, width] patch features -> [N, s * s, n_embed] (s = ceil(sqrt(P) / ratio)); the
    MLP: Linear, then (GELU, Linear) per further layer."""

    def __init__(self, spec: DeepseekVL2Spec) -> None:
        super().__init__()
        self.ratio = r = spec.downsample_ratio
        inner = spec.n_embed * spec.projector_mlp_ratio
        # The reference builds a first and a last Linear whatever the depth (depth - 2 between).
        linears = max(spec.projector_depth, 2)
        dims = [spec.width * r * r] + [inner] * (linears - 1) + [spec.n_embed]
        modules: list[nn.Module] = []
        for i in range(linears):
            if i:
                modules.append(nn.GELU())
            modules.append(nn.Linear(dims[i], dims[i + 1]))
        self.layers = nn.Sequential(*modules)  # checkpoint names layers.{0, 2, ...}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, p, c = x.shape
        side = round(p**0.5)
        grid = x.view(n, side, side, c)
        pad = -side % self.ratio
        if pad:  # zero rows and columns at the bottom and right
            grid = F.pad(grid, (0, 0, 0, pad, 0, pad))
        # F.unfold orders each block's features channel-major: c * r * r + (row * r + col).
        blocks = F.unfold(grid.permute(0, 3, 1, 2), kernel_size=self.ratio, stride=self.ratio)
        return self.layers(blocks.transpose(1, 2))  # type: ignore[no-any-return]


def _vision_mapping() -> list[tuple[str, str, Any]]:
    """timm block names -> the SigLIP tower's (after the `vision.blocks.` prefix rename)."""
    return [
        ("self_attn.qkv_proj", "attn.qkv", "qkv"),
        ("self_attn.out_proj", "attn.proj", None),
        ("layer_norm1", "norm1", None),
        ("layer_norm2", "norm2", None),
    ]


class DeepseekVLV2ForCausalLM(DeepseekV2ForCausalLM, EncodesImages):
    checkpoint_prefixes: Sequence[tuple[str, str]] = [
        ("language.model.", "model."),
        ("language.lm_head.", "lm_head."),
        ("vision.patch_embed.proj.", "vision_tower.embeddings.patch_embedding."),
        ("vision.pos_embed", "vision_tower.embeddings.position_embedding.weight"),
        ("vision.blocks.", "vision_tower.encoder.layers."),
        ("vision.norm.", "vision_tower.post_layernorm."),
    ]

    def __init__(self, hf_config: dict[str, Any]) -> None:
        spec = deepseek_vl2_spec(hf_config)
        super().__init__(spec.text)
        self.spec = spec
        self.vision_tower = SiglipVisionTower(
            SiglipVisionConfig(
                hidden_size=spec.width,
                intermediate_size=spec.mlp_hidden,
                num_hidden_layers=spec.layers,
                num_attention_heads=spec.heads,
                image_size=spec.image_size,
                patch_size=spec.patch_size,
            )  # timm's SigLIP: LayerNorm eps 1e-6, tanh GELU, as the config's defaults
        )
        for module in self.vision_tower.modules():
            if isinstance(module, SiglipAttention):  # the checkpoint's qkv comes fused
                qkv = module.qkv_proj
                for p in qkv.parameters():
                    set_weight_loader(p, self._fused_qkv_loader(qkv.weight_loader, spec.width))
        pos = self.vision_tower.embeddings.position_embedding.weight
        set_weight_loader(pos, self._pos_embed_loader)
        self.projector = DownsampleProjector(spec)
        hidden = spec.text.hidden_size
        self.image_newline = nn.Parameter(torch.empty(hidden), requires_grad=False)
        self.view_seperator = nn.Parameter(torch.empty(hidden), requires_grad=False)
        # Instance attributes: the decoder's mapping depends on the config.
        self.stacked_params_mapping = [*self.stacked_params_mapping, *_vision_mapping()]
        tied = ("language.lm_head.weight",) if spec.text.tie_word_embeddings else ()
        self.skip_weight_suffixes = ("rotary_emb.inv_freq", *_ATTN_POOL, *tied)
        self.image_shape = (3, spec.image_size, spec.image_size)

    @staticmethod
    def _fused_qkv_loader(load_part: Any, width: int) -> Any:
        def load(param: nn.Parameter, loaded: Loaded, shard_id: Any = None) -> None:
            for i, part in enumerate("qkv"):  # timm: rows [q; k; v], each `width`
                load_part(param, narrow_loaded(loaded, 0, i * width, width), part)

        return load

    @staticmethod
    def _pos_embed_loader(param: nn.Parameter, loaded: Loaded, shard_id: Any = None) -> None:
        full = read_full(loaded)  # timm: [1, patches, width]
        copy_checked(param, full.reshape(full.shape[-2:]), "pos_embed")

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """[T] -> [T, hidden]; placeholder rows are replaced by the image embeddings."""
        out: torch.Tensor = self.model.embed_tokens(ids.clamp(max=self.config.vocab_size - 1))
        return out

    def encode_images(self, images: list[ImageInput]) -> list[torch.Tensor]:
        """One tower call over every view of every image -> [num_tokens, hidden] each.
        pixel_values [1 + w * h, 3, S, S] (global view, then local tiles row-major);
        grid [w, h]: local tiles across and down."""
        views = []
        for img in images:
            shape = tuple(img.pixel_values.shape)
            if len(shape) != 4 or shape[1:] != self.image_shape or len(img.grid) != 2:
                raise ValueError(
                    f"image pixel_values {shape}, grid {list(img.grid)}; the model takes "
                    f"[1 + tiles, *{self.image_shape}] and grid [width tiles, height tiles]"
                )
            w, h = (int(g) for g in img.grid)
            if shape[0] != 1 + w * h or img.num_tokens != self.spec.image_tokens(w, h):
                raise ValueError(
                    f"an image of {w}x{h} tiles has {shape[0]} views and {img.num_tokens} "
                    f"placeholders; the model expects {1 + w * h} and {self.spec.image_tokens(w, h)}"
                )
            views.append(shape[0])
        weight = self.model.embed_tokens.weight
        pixels = torch.from_numpy(np.concatenate([img.pixel_values for img in images]))
        feats = self.projector(self.vision_tower(pixels.to(weight.device, weight.dtype)))
        return [
            self._layout(per_image, *(int(g) for g in img.grid)).to(weight.dtype)
            for img, per_image in zip(images, torch.split(feats, views), strict=True)
        ]

    def _layout(self, feats: torch.Tensor, w: int, h: int) -> torch.Tensor:
        """feats [1 + w * h, s * s, D] -> the image's placeholder embeddings [num_tokens, D]."""
        s, d = self.spec.tokens_per_side, feats.shape[-1]
        newline = self.image_newline.to(feats.dtype)

        def with_newlines(grid: torch.Tensor) -> torch.Tensor:  # [rows, cols, D]
            column = newline.expand(grid.shape[0], 1, d)
            return torch.cat([grid, column], dim=1).reshape(-1, d)

        global_view = with_newlines(feats[0].view(s, s, d))
        # (tile row, tile col, row, col) -> rows of the stitched grid: (th h) (tw w).
        tiles = feats[1:].view(h, w, s, s, d).permute(0, 2, 1, 3, 4).reshape(h * s, w * s, d)
        local = with_newlines(tiles)
        sep = self.view_seperator.to(feats.dtype)[None]
        if self.spec.global_view_pos == "head":
            return torch.cat([global_view, sep, local])
        return torch.cat([local, sep, global_view])
