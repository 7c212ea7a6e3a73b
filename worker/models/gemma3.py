"""Gemma 3 vision-language model (`Gemma3ForConditionalGeneration`): a SigLIP tower (all
layers + post-layernorm) whose patch features are average-pooled to `mm_tokens_per_image`,
RMS-normed and projected (`multi_modal_projector`) onto the `<image_soft_token>` placeholders
of the Gemma 3 decoder.

Image tokens attend to each other in full (bidirectionally) during prefill, as in
transformers: the architecture's `bidirectional_images` capability (common/architectures.py)
tells the runner to pass each image's span to the attention backend, and the scheduler never
splits an image across prefill chunks nor starts a chunk from a prefix hit that ends inside one.

Parameters: `model.*` (decoder, as Gemma3ForCausalLM), `vision_tower.*` (SigLIP's
`vision_model.*`), `multi_modal_projector.*`, `lm_head` (tied by default). Checkpoints name
them in three ways, all mapped by `checkpoint_prefixes`: the hub's (`language_model.model.*`,
`vision_tower.vision_model.*`), what transformers 5.24 saves (`language_model.model.*`,
`vision_tower.*`) and the v5 module tree (`model.language_model.*`, `model.vision_tower.*`).

Pan-and-scan (extra crops of wide images) is not supported: off by default in transformers
and SGLang. A configured final_logit_softcapping is applied here too (transformers 5.24's
multimodal class skips it; released Gemma 3 checkpoints set none).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fovea.common.messages import ImageInput
from fovea.worker.models.base import EncodesImages
from fovea.worker.models.gemma3_text import Gemma3ForCausalLM, GemmaRMSNorm
from fovea.worker.models.vision.siglip import SiglipVisionConfig, SiglipVisionTower


class Gemma3MultiModalProjector(nn.Module):
    def __init__(self, vision: SiglipVisionConfig, text_hidden: int, tokens: int) -> None:
        super().__init__()
        side = round(tokens**0.5)
        patches_side = vision.image_size // vision.patch_size
        if side * side != tokens or patches_side % side:
            raise ValueError(
                f"mm_tokens_per_image {tokens} must be a square whose side divides the "
                f"{patches_side} patches per image side"
            )
        self.patches_side, self.kernel = patches_side, patches_side // side
        # [vision_hidden, text_hidden]: features @ weight (not a Linear's transposed layout).
        self.mm_input_projection_weight = nn.Parameter(
            torch.zeros(vision.hidden_size, text_hidden), requires_grad=False
        )
        self.mm_soft_emb_norm = GemmaRMSNorm(vision.hidden_size, vision.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, patches, vision_hidden] -> [N, tokens, text_hidden]."""
        n, _, hidden = x.shape
        side = self.patches_side
        grid = x.transpose(1, 2).reshape(n, hidden, side, side)  # patches are row-major
        pooled = F.avg_pool2d(grid, self.kernel, self.kernel).flatten(2).transpose(1, 2)
        return torch.matmul(self.mm_soft_emb_norm(pooled), self.mm_input_projection_weight)


class Gemma3ForConditionalGeneration(Gemma3ForCausalLM, EncodesImages):
    checkpoint_prefixes: Sequence[tuple[str, str]] = [
        ("model.language_model.", "model."),
        ("model.vision_tower.vision_model.", "vision_tower."),
        ("model.vision_tower.", "vision_tower."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("language_model.model.", "model."),
        ("language_model.lm_head.", "lm_head."),
        ("vision_tower.vision_model.", "vision_tower."),
    ]

    def __init__(self, hf_config: dict[str, Any]) -> None:
        super().__init__(hf_config)
        vision = SiglipVisionConfig.from_hf(hf_config.get("vision_config") or {})
        self.mm_tokens_per_image = int(hf_config.get("mm_tokens_per_image", 256))
        self.vision_tower = SiglipVisionTower(vision)  # all layers, then post_layernorm
        self.multi_modal_projector = Gemma3MultiModalProjector(
            vision, self.config.hidden_size, self.mm_tokens_per_image
        )
        self.image_shape = (vision.num_channels, vision.image_size, vision.image_size)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """[T] -> scaled text embeddings [T, hidden] (image rows are replaced, unscaled)."""
        return self.model.embed(ids)

    def encode_images(self, images: list[ImageInput]) -> list[torch.Tensor]:
        """One tower call over all images -> [mm_tokens_per_image, hidden] each."""
        for img in images:
            if tuple(img.pixel_values.shape) != self.image_shape:
                raise ValueError(
                    f"image pixel_values {tuple(img.pixel_values.shape)}; the tower takes "
                    f"{self.image_shape}"
                )
            if img.num_tokens != self.mm_tokens_per_image:
                raise ValueError(
                    f"image has {img.num_tokens} placeholder tokens; the model gives "
                    f"{self.mm_tokens_per_image}"
                )
        weight = self.model.embed_tokens.weight
        pixels = torch.from_numpy(np.stack([img.pixel_values for img in images]))
        feats = self.vision_tower(pixels.to(weight.device, weight.dtype))  # [N, P, vision]
        return list(self.multi_modal_projector(feats).to(weight.dtype).unbind(0))
