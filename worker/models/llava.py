"""LLaVA: a vision tower (CLIP or SigLIP) whose selected hidden states are projected (an MLP)
onto the `<image>` placeholder tokens of a Llama / Mistral / Qwen2 decoder on 1-D positions.

One class serves the family, driven by `LlavaSpec` (common/families/llava.py): LLaVA-1.5 (one
tile per image), LLaVA-NeXT / 1.6 and Llama3-LLaVA-NeXT (anyres tiles, unpadded, a newline per
row: llava_next.py), LLaVA-OneVision (SigLIP, anyres_max, several images one padded tile each),
in both checkpoint layouts:
- converted (`LlavaForConditionalGeneration`, `LlavaNextForConditionalGeneration`,
  `LlavaOnevisionForConditionalGeneration`): `language_model.model.*`,
  `language_model.lm_head.*`, `vision_tower[.vision_model].*`, `multi_modal_projector.*`,
  `image_newline` (or the v5 module tree under `model.`);
- original (`LlavaLlamaForCausalLM`, `LlavaMistralForCausalLM`, `LlavaQwenForCausalLM`):
  `model.*`, `lm_head.*`, `model.vision_tower.vision_tower.vision_model.*`,
  `model.mm_projector.{0,2}.*`, `model.image_newline`.
Parameters: `model.*` and `lm_head.*` (decoder, as LlamaForCausalLM), `vision_tower.*`,
`multi_modal_projector.linear_{1,2}.*`, `image_newline`. Only the tower layers up to the
deepest selected hidden state are built; the checkpoint's others are skipped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fovea.common.families.llava import LlavaSpec, llava_spec
from fovea.common.messages import ImageInput
from fovea.worker.layers.linear import ColumnParallelLinear, RowParallelLinear
from fovea.worker.models.base import EncodesImages
from fovea.worker.models.llama import LlamaForCausalLM
from fovea.worker.models.llava_next import pack_anyres
from fovea.worker.models.vision.clip import LAYER_TENSORS, ClipVisionConfig, ClipVisionTower
from fovea.worker.models.vision.siglip import SiglipVisionConfig, SiglipVisionTower

PROJECTOR_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "silu": F.silu,
    "relu": F.relu,
}

# SigLIP's attention-pooling head (not used by VLMs), should a checkpoint carry it.
_SIGLIP_HEAD = tuple(
    f".head.{name}"
    for name in (
        "probe",
        "attention.in_proj_weight",
        "attention.in_proj_bias",
        "attention.out_proj.weight",
        "attention.out_proj.bias",
        "layernorm.weight",
        "layernorm.bias",
        "mlp.fc1.weight",
        "mlp.fc1.bias",
        "mlp.fc2.weight",
        "mlp.fc2.bias",
    )
)


class LlavaMultiModalProjector(nn.Module):
    """mlp: linear_1 (column-parallel), activation, linear_2 (row-parallel, all-reduces);
    linear (LLaVA v1): linear_1 alone, replicated."""

    def __init__(self, spec: LlavaSpec, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.linear_1: nn.Linear | ColumnParallelLinear
        self.linear_2: RowParallelLinear | None = None
        if spec.projector == "linear":
            self.linear_1 = nn.Linear(in_dim, hidden, bias=spec.projector_bias)
        else:
            self.linear_1 = ColumnParallelLinear(in_dim, hidden, bias=spec.projector_bias)
            self.linear_2 = RowParallelLinear(hidden, hidden, bias=spec.projector_bias)
        if spec.projector_act not in PROJECTOR_ACTIVATIONS:
            raise ValueError(f"projector_hidden_act {spec.projector_act!r} is not supported")
        self.act = PROJECTOR_ACTIVATIONS[spec.projector_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., in_dim] -> [..., hidden]."""
        x = self.linear_1(x)
        if self.linear_2 is not None:
            x = self.linear_2(self.act(x))
        return x


class LlavaForConditionalGeneration(LlamaForCausalLM, EncodesImages):  # type: ignore[misc,unused-ignore]
    # First match renames: converted v5 module tree, original layout, converted hub layout.
    checkpoint_prefixes: Sequence[tuple[str, str]] = [
        ("model.language_model.", "model."),
        ("model.vision_tower.vision_tower.vision_model.", "vision_tower."),
        ("model.vision_tower.vision_model.", "vision_tower."),
        ("model.vision_tower.", "vision_tower."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.mm_projector.0.", "multi_modal_projector.linear_1."),
        ("model.mm_projector.2.", "multi_modal_projector.linear_2."),
        ("model.mm_projector.", "multi_modal_projector.linear_1."),
        ("model.image_newline", "image_newline"),
        ("language_model.model.", "model."),
        ("language_model.lm_head.", "lm_head."),
        ("vision_tower.vision_model.", "vision_tower."),
    ]

    def __init__(self, hf_config: dict[str, Any]) -> None:
        spec = llava_spec(hf_config)
        text = spec.text_config | {"tie_word_embeddings": spec.tie_word_embeddings}
        super().__init__({"text_config": text})  # decoder and lm_head
        self.spec = spec
        v = spec.vision_config
        depth = int(v["num_hidden_layers"])
        # transformers' hidden_states has depth + 1 entries (0: the embeddings).
        for i in spec.feature_layers:
            if not -depth - 1 <= i <= depth:
                raise ValueError(f"vision feature layer {i} is out of range for {depth} layers")
        self.feature_layers = [i % (depth + 1) for i in spec.feature_layers]
        built = max(self.feature_layers)
        self.vision_tower: ClipVisionTower | SiglipVisionTower
        if spec.tower == "clip":
            self.vision_tower = ClipVisionTower(ClipVisionConfig.from_hf(v), num_layers=built)
            unused = self.vision_tower.unused_weight_suffixes()
        else:
            siglip = SiglipVisionConfig.from_hf(v)
            self.vision_tower = SiglipVisionTower(siglip, num_layers=built, post_layernorm=False)
            later = [f".encoder.layers.{i}.{t}" for i in range(built, depth) for t in LAYER_TENSORS]
            norm = (".post_layernorm.weight", ".post_layernorm.bias", ".position_ids")
            unused = (*later, *norm, *_SIGLIP_HEAD)
        vision_hidden = int(v["hidden_size"])
        self.multi_modal_projector = LlavaMultiModalProjector(
            spec, vision_hidden * len(self.feature_layers), self.config.hidden_size
        )
        self.image_newline: nn.Parameter | None = None
        if spec.anyres:
            self.image_newline = nn.Parameter(
                torch.empty(self.config.hidden_size), requires_grad=False
            )
        self.image_shape = (int(v.get("num_channels", 3)), spec.image_size, spec.image_size)
        tied = ("language_model.lm_head.weight",) if spec.tie_word_embeddings else ()
        # Per instance: which tower weights go unused depends on the config.
        skip = (*LlamaForCausalLM.skip_weight_suffixes, *unused, *tied)
        self.skip_weight_suffixes = skip

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """[T] -> [T, hidden]. A placeholder id past the vocabulary (an `<image>` token added
        to the tokenizer only) embeds as the last row; its rows are replaced anyway."""
        emb: torch.Tensor = self.model.embed_tokens(ids.clamp(max=self.config.vocab_size - 1))
        return emb

    def tile_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] tiles -> projected features [N, F, hidden]: the selected hidden states
        (first feature dropped under the 'default' strategy), concatenated, projected."""
        if isinstance(self.vision_tower, ClipVisionTower):
            states = self.vision_tower.hidden_states(pixels, self.feature_layers)
        else:
            states = self._siglip_states(pixels)
        if self.spec.drop_first:
            states = [s[:, 1:] for s in states]
        x = states[0] if len(states) == 1 else torch.cat(states, dim=-1)
        return self.multi_modal_projector(x)  # type: ignore[no-any-return]

    def _siglip_states(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        tower = self.vision_tower
        assert isinstance(tower, SiglipVisionTower)
        x = tower.embeddings(pixels)  # [N, P, hidden]; hidden_states[0]
        states = {0: x} if 0 in self.feature_layers else {}
        for i, layer in enumerate(tower.encoder.layers, 1):
            x = layer(x)
            if i in self.feature_layers:
                states[i] = x
        return [states[i] for i in self.feature_layers]

    def pool_video(self, feats: torch.Tensor) -> torch.Tensor:
        """OneVision's video features: [T, p*p, hidden] per frame -> each frame's p x p grid
        pooled bilinearly to ceil(p / 2) a side, frames in order, then one image_newline:
        [T * ceil(p / 2)² + 1, hidden] (transformers' get_video_features)."""
        if self.image_newline is None:
            raise ValueError("this model takes no videos (it has no image_newline)")
        frames, n, hidden = feats.shape
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"{n} features per frame are not a square grid")
        grid = feats.view(frames, side, side, hidden).permute(0, 3, 1, 2)
        half = math.ceil(side / 2)
        pooled = F.interpolate(grid, size=[half, half], mode="bilinear")
        flat = pooled.permute(0, 2, 3, 1).reshape(frames * half * half, hidden)
        return torch.cat([flat, self.image_newline[None].to(flat.dtype)])

    def encode_images(self, images: list[ImageInput]) -> list[torch.Tensor]:
        """One tower call over every tile of every image -> [num_tokens, hidden] each.
        pixel_values [tiles, C, H, W]; grid [height, width] of the original image. A video
        (second_per_grid_t > 0): pixel_values [frames, C, H, W], grid [frames, H, W]."""
        tiles = []
        for img in images:
            shape = tuple(img.pixel_values.shape)
            if len(shape) != 4 or shape[1:] != self.image_shape:
                raise ValueError(
                    f"image pixel_values {shape}; the tower takes [tiles, *{self.image_shape}]"
                )
            if not self.spec.anyres and shape[0] != 1 and img.second_per_grid_t <= 0:
                raise ValueError(f"{shape[0]} tiles for a model that takes one per image")
            tiles.append(shape[0])
        weight = self.model.embed_tokens.weight
        pixels = torch.from_numpy(np.concatenate([img.pixel_values for img in images]))
        feats = self.tile_features(pixels.to(weight.device, weight.dtype))  # [N, F, hidden]
        out = []
        for img, per_image in zip(images, torch.split(feats, tiles), strict=True):
            if img.second_per_grid_t > 0:  # a video (OneVision): its frames are the tiles
                emb = self.pool_video(per_image)
            elif self.image_newline is None:
                emb = per_image[0]
            else:
                height, width = (int(g) for g in img.grid)
                emb = pack_anyres(per_image, height, width, self.spec, self.image_newline)
            if emb.shape[0] != img.num_tokens:
                raise ValueError(
                    f"image of {list(img.grid)} gives {emb.shape[0]} features for "
                    f"{img.num_tokens} placeholder tokens"
                )
            out.append(emb)
        return out
