"""The reference for DeepSeek-VL2 on the tiny checkpoints (tiny_deepseek_vl2.py), independent
of Fovea's code: transformers' SiglipVisionModel and DeepseekV2ForCausalLM (for use_mla false,
its attention replaced by transformers' LlamaAttention, as DeepSeek-VL2's modeling_deepseek
builds it), and DeepSeek-VL2's own steps written out plainly here from its published code:
the conversation format "deepseek", `tokenize_with_images` (tile choice, ImageOps.pad,
torchvision's ToTensor + Normalize), the downsample_mlp_gelu projector and the "2D" tile
layout of `prepare_inputs_embeds`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

ROLES = {"user": "<|User|>", "assistant": "<|Assistant|>"}
EOS_TEXT = "<｜end▁of▁sentence｜>"


def build_language_model(variant: str) -> Any:
    """transformers' DeepseekV2ForCausalLM (random weights) in eager attention; "mha": each
    layer's attention is LlamaAttention fed its own rotary, as DeepSeek-VL2 does."""
    from tiny_deepseek_vl2 import hf_language_config, llama_attention_config
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    cfg = DeepseekV2Config(**hf_language_config(variant))
    cfg._attn_implementation = "eager"
    model = DeepseekV2ForCausalLM(cfg)
    if variant == "mha":
        llama = LlamaConfig(**llama_attention_config(variant))
        llama._attn_implementation = "eager"

        class LlamaAttentionInDeepseek(LlamaAttention):  # type: ignore[misc]
            def __init__(self, layer_idx: int) -> None:
                super().__init__(llama, layer_idx)
                self.rotary = LlamaRotaryEmbedding(llama)

            def forward(  # type: ignore[override]
                self, hidden_states: torch.Tensor, attention_mask: Any = None,
                position_ids: Any = None, cache: Any = None, **kwargs: Any,
            ) -> Any:  # fmt: skip
                kwargs.pop("position_embeddings", None)  # DeepseekV2's complex MLA rotary
                cos_sin = self.rotary(hidden_states, position_ids)
                return super().forward(
                    hidden_states, cos_sin, attention_mask, cache=cache, **kwargs
                )

        for i, layer in enumerate(model.model.layers):
            layer.self_attn = LlamaAttentionInDeepseek(i)
    return model.float().eval()


# ---------------------------------------------------------------- DeepSeek-VL2's processor


def format_conversation(turns: list[tuple[str, str]], system: str = "") -> str:
    """conversation.py's "deepseek" template (SeparatorStyle.DeepSeek) with the open assistant
    turn, stripped as format_messages does."""
    seps = ["\n\n", EOS_TEXT]
    ret = system + seps[0] if system else ""
    messages = [(ROLES[role], text.strip()) for role, text in turns] + [("<|Assistant|>", "")]
    for i, (role, message) in enumerate(messages):
        ret += role + ": " + message + seps[i % 2] if message else role + ":"
    return ret.strip()


def select_best_resolution(image_size: tuple[int, int], candidates: list[list[int]]) -> Any:
    original_width, original_height = image_size
    best_fit, max_effective, min_wasted = None, 0, float("inf")
    for width, height in candidates:
        scale = min(width / original_width, height / original_height)
        w, h = int(original_width * scale), int(original_height * scale)
        effective = min(w * h, original_width * original_height)
        wasted = width * height - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            max_effective, min_wasted, best_fit = effective, wasted, (width, height)
    return best_fit


def to_tensor_normalized(image: Image.Image, mean: float = 0.5, std: float = 0.5) -> torch.Tensor:
    """torchvision's ToTensor then Normalize(mean, std), in float32."""
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)
    return x.sub(torch.tensor(mean)).div(torch.tensor(std))


class Processor:
    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoTokenizer

        pp = json.loads((model_dir / "processor_config.json").read_text())
        self.candidates = pp["candidate_resolutions"]
        self.image_size = self.candidates[0][0]
        self.patch_size, self.ratio = pp["patch_size"], pp["downsample_ratio"]
        self.tok = AutoTokenizer.from_pretrained(str(model_dir))
        self.image_token_id = self.tok.convert_tokens_to_ids("<image>")

    def tokenize_with_images(
        self, text: str, images: list[Image.Image]
    ) -> tuple[list[int], list[torch.Tensor], list[tuple[int, int]]]:
        """(bos + ids with each <image> expanded, views per image [1 + tiles, 3, S, S],
        (width tiles, height tiles) per image)."""
        s, cropping = self.image_size, len(images) <= 2
        color = tuple(int(x * 255) for x in (0.5, 0.5, 0.5))
        splits = text.split("<image>")
        ids: list[int] = [self.tok.bos_token_id]
        views, crops = [], []
        for piece, image in zip(splits, images, strict=False):
            ids += self.tok.encode(piece, add_special_tokens=False)
            best_w, best_h = (
                select_best_resolution(image.size, self.candidates) if cropping else (s, s)
            )
            tiles = [to_tensor_normalized(ImageOps.pad(image, (s, s), color=color))]
            local = ImageOps.pad(image, (best_w, best_h), color=color)
            for i in range(0, best_h, s):
                for j in range(0, best_w, s):
                    tiles.append(to_tensor_normalized(local.crop((j, i, j + s, i + s))))
            views.append(torch.stack(tiles))
            tw, th = best_w // s, best_h // s
            crops.append((tw, th))
            h = w = math.ceil((s // self.patch_size) / self.ratio)
            ids += [self.image_token_id] * (h * (w + 1) + 1 + (th * h) * (tw * w + 1))
        ids += self.tok.encode(splits[-1], add_special_tokens=False)
        return ids, views, crops


# ---------------------------------------------------------------- the model


class Reference:
    def __init__(self, model_dir: Path) -> None:
        from safetensors.torch import load_file
        from transformers import SiglipVisionModel

        ref = model_dir.parent / "reference"
        self.processor = Processor(model_dir)
        self.vision = SiglipVisionModel.from_pretrained(str(ref / "vision")).float().eval()
        self.language = build_language_model((ref / "variant").read_text())
        self.language.load_state_dict(load_file(str(ref / "language.safetensors")))
        weights = load_file(str(model_dir / "model.safetensors"))
        self.proj = [(weights[f"projector.layers.{i}.weight"], weights[f"projector.layers.{i}.bias"])
                     for i in (0, 2)]  # fmt: skip
        self.newline, self.separator = weights["image_newline"], weights["view_seperator"]
        self.config = json.loads((model_dir / "config.json").read_text())

    def projector(self, x: torch.Tensor) -> torch.Tensor:
        """MlpProjector.forward for downsample_mlp_gelu, depth 2."""
        bs, hw, dim = x.shape
        h = w = int(hw**0.5)
        pad = self.processor.ratio - h % self.processor.ratio if h % self.processor.ratio else 0
        x = x.reshape(bs, h, w, dim)
        if pad > 0:
            x = F.pad(x, (0, 0, 0, pad, 0, pad), "constant", 0)
        x = x.permute(0, 3, 1, 2)
        r = self.processor.ratio
        x = F.unfold(x, kernel_size=r, stride=r, padding=0).permute(0, 2, 1)
        (w1, b1), (w2, b2) = self.proj
        return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)

    def image_embeddings(self, views: torch.Tensor, crop: tuple[int, int]) -> torch.Tensor:
        """prepare_inputs_embeds for one image with tile_tag 2D, global view at the head."""
        feats = self.projector(self.vision(pixel_values=views).last_hidden_state)
        _, hw, d = feats.shape
        h = w = int(hw**0.5)
        tw, th = crop
        g = torch.cat([feats[0].view(h, w, d), self.newline.expand(h, 1, d)], dim=1).view(-1, d)
        local = feats[1 : 1 + tw * th]  # "(th tw) (h w) d -> (th h) (tw w) d"
        local = local.view(th, tw, h, w, d).permute(0, 2, 1, 3, 4).reshape(th * h, tw * w, d)
        local = torch.cat([local, self.newline.expand(th * h, 1, d)], dim=1).view(-1, d)
        return torch.cat([g, self.separator[None], local], dim=0)

    def input_embeds(
        self, ids: list[int], views: list[torch.Tensor], crops: list[Any]
    ) -> torch.Tensor:
        ids_t = torch.tensor([ids])
        embeds = self.language.get_input_embeddings()(ids_t)
        if views:
            images = torch.cat(
                [self.image_embeddings(v, c) for v, c in zip(views, crops, strict=True)]
            )
            mask = (ids_t == self.processor.image_token_id).unsqueeze(-1)
            embeds = embeds.masked_scatter(mask, images)
        return embeds  # type: ignore[no-any-return]

    @torch.no_grad()
    def logits(self, ids: list[int], views: list[torch.Tensor], crops: list[Any]) -> torch.Tensor:
        """[L, vocab] float32 prefill logits."""
        out = self.language(inputs_embeds=self.input_embeds(ids, views, crops))
        return out.logits[0].float()  # type: ignore[no-any-return]

    @torch.no_grad()
    def greedy(
        self, ids: list[int], views: list[torch.Tensor], crops: list[Any], n: int
    ) -> list[int]:
        embeds = self.input_embeds(ids, views, crops)
        out = self.language.generate(
            inputs_embeds=embeds, attention_mask=torch.ones(1, len(ids), dtype=torch.int64),
            do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
            pad_token_id=0,
        )  # fmt: skip
        return [int(t) for t in out[0, -n:]]
