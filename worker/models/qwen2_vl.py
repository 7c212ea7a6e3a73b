"""Qwen2-VL: a ViT (2-D rotary, attention within each image) whose merged 2x2 patch groups
replace the image placeholder tokens of a Qwen2 decoder that runs on M-RoPE positions.

Parameters are named as in the older hub layout (`visual.*`, `model.*`, `lm_head.*`);
`checkpoint_prefixes` maps transformers v5's `model.visual.*` / `model.language_model.*`.
The vision tower is replicated on every TP rank, except that its MLPs (and the merger's) use
the column/row-parallel layers: every rank sees every patch, the row layer all-reduces.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fovea.common.messages import ImageInput
from fovea.worker.layers.linear import (
    ColumnParallelLinear,
    Loaded,
    RowParallelLinear,
    copy_checked,
    read_full,
    set_weight_loader,
)
from fovea.worker.layers.rotary import MRotaryEmbedding, RotaryEmbedding, apply_rotary_inplace
from fovea.worker.models.base import EncoderStages, EncodesImages, MRopePositions, run_stages
from fovea.worker.models.llama import DecoderConfig
from fovea.worker.models.qwen2 import Qwen2ForCausalLM

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


@dataclass(frozen=True)
class VisionConfig:
    hidden: int  # the ViT width (Qwen2-VL `embed_dim`, Qwen2.5-VL `hidden_size`)
    depth: int
    num_heads: int
    mlp_hidden: int
    act: str
    patch_size: int
    temporal_patch_size: int
    in_channels: int
    merge_size: int
    out_hidden: int  # the merger's output: the decoder's hidden size
    rope_theta: float
    window_size: int = 0  # Qwen2.5-VL: window side in pixels
    full_attention_blocks: tuple[int, ...] = ()  # Qwen2.5-VL: blocks not windowed

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads

    @property
    def patch_dim(self) -> int:  # one flattened patch: C * temporal_patch * patch * patch
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @staticmethod
    def common(v: dict[str, Any]) -> dict[str, Any]:
        """Fields both versions name alike (older hub configs say `in_chans`)."""
        act = v.get("hidden_act", "quick_gelu")
        if act not in ACTIVATIONS:
            raise ValueError(f"vision hidden_act {act!r} is not supported")
        return dict(
            depth=int(v["depth"]),
            num_heads=int(v["num_heads"]),
            act=act,
            patch_size=int(v.get("patch_size", 14)),
            temporal_patch_size=int(v.get("temporal_patch_size", 2)),
            in_channels=int(v.get("in_channels", v.get("in_chans", 3))),
            merge_size=int(v.get("spatial_merge_size", 2)),
            rope_theta=float((v.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
        )


def _load_conv_as_linear(param: nn.Parameter, loaded: Loaded, shard_id: Any = None) -> None:
    # A Conv3d [hidden, C, T, P, P] with stride = kernel over one patch is a Linear over the
    # patch flattened as (C, T, P, P): the image processor's pixel_values layout.
    w = read_full(loaded)
    copy_checked(param, w.reshape(w.shape[0], -1), "patch_embed")


class PatchEmbed(nn.Module):
    def __init__(self, v: VisionConfig) -> None:
        super().__init__()
        self.vcfg = v
        self.proj = nn.Linear(v.patch_dim, v.hidden, bias=False)
        set_weight_loader(self.proj.weight, _load_conv_as_linear)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [N, C*T*P*P] normalized, in the weight's dtype -> [N, hidden]."""
        return self.proj(pixels)  # type: ignore[no-any-return]

    def still(
        self, raw: torch.Tensor, scale: Sequence[float], shift: Sequence[float]
    ) -> torch.Tensor:
        """A still image as the processor sends it: raw [N, C*P*P] uint8, one frame, whose
        normalized value is raw * scale[c] + shift[c], repeated over the T frames -> [N, hidden].
        Both are linear, so they fold into the weight: W' = scale[c] * sum_t W[:, c, t],
        bias = sum over (c, p) of shift[c] * sum_t W[:, c, t]. Equal to forward on the
        normalized, repeated input up to float32 rounding (a different summation order)."""
        v = self.vcfg
        w = self.proj.weight.float().view(v.hidden, v.in_channels, v.temporal_patch_size, -1)
        w = w.sum(2)  # [hidden, C, P*P]
        dev = w.device
        weight = (w * torch.tensor(scale, device=dev)[:, None]).flatten(1)
        bias = w.sum(2) @ torch.tensor(shift, device=dev)  # [hidden]
        out = F.linear(raw.to(dev, torch.float32), weight, bias)
        return out.to(self.proj.weight.dtype)


class VisionRotary(nn.Module):
    """2-D rotary: the first half of the rotated frequencies follow the patch row, the second
    half its column (head_dim / 4 frequencies each)."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        half = head_dim // 2
        exps = torch.arange(0, half, 2, dtype=torch.float32) / half
        self.inv_freq: torch.Tensor
        self.register_buffer("inv_freq", 1.0 / theta**exps, persistent=False)

    def forward(self, pos_hw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pos_hw [N, 2] -> cos, sin [N, 1, head_dim] float32."""
        freqs = (pos_hw.float()[..., None] * self.inv_freq).flatten(1)  # [N, head_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)
        return emb.cos(), emb.sin()


def vision_positions(grids: list[list[int]], merge: int, device: torch.device) -> torch.Tensor:
    """[N, 2] (row, column) of every patch, in the processor's order: merge x merge groups
    row-major over the image, patches row-major within a group, frames one after another."""
    out = []
    for t, h, w in grids:
        rows = torch.arange(h, device=device)[:, None].expand(h, w)
        cols = torch.arange(w, device=device)[None, :].expand(h, w)
        hw = torch.stack((rows, cols), dim=-1)  # [h, w, 2]
        hw = hw.reshape(h // merge, merge, w // merge, merge, 2).transpose(1, 2)
        out.append(hw.reshape(-1, 2).repeat(t, 1))
    return torch.cat(out)


def frame_bounds(grids: list[list[int]]) -> list[int]:
    """Patch offsets where each frame (one per image here) starts, and the total."""
    bounds = [0]
    for t, h, w in grids:
        base = bounds[-1]
        bounds.extend(base + h * w * (i + 1) for i in range(t))
    return bounds


class VisionAttention(nn.Module):
    def __init__(self, v: VisionConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = v.num_heads, v.head_dim
        self.qkv = nn.Linear(v.hidden, 3 * v.hidden, bias=True)  # rows: q, k, v; heads inside
        self.proj = nn.Linear(v.hidden, v.hidden, bias=True)

    def forward(
        self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], bounds: list[int]
    ) -> torch.Tensor:
        """x [N, hidden]; attention only within each [bounds[i], bounds[i+1]) segment."""
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        # Rotary in float32, as HF: on float32 weights q and k are views of this call's qkv,
        # rotated in place; on bf16 .float() made copies.
        q, k = apply_rotary_inplace(q.float(), k.float(), cos_sin)
        q, k = q.to(v.dtype), k.to(v.dtype)
        out = torch.empty_like(v)  # [N, heads, head_dim]
        # Segments of one length run as one batched SDPA call (windows are mostly equal).
        starts_by_length: dict[int, list[int]] = {}
        for lo, hi in itertools.pairwise(bounds):
            if hi > lo:
                starts_by_length.setdefault(hi - lo, []).append(lo)
        for length, starts in starts_by_length.items():
            rows = torch.tensor(starts, device=x.device)[:, None] + torch.arange(
                length, device=x.device
            )  # [S, length]
            qs, ks, vs = (t[rows].transpose(1, 2) for t in (q, k, v))  # [S, heads, len, dim]
            out[rows] = F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2)
        return self.proj(out.reshape(n, -1))  # type: ignore[no-any-return]


class VisionMLP(nn.Module):
    def __init__(self, v: VisionConfig) -> None:
        super().__init__()
        self.fc1 = ColumnParallelLinear(v.hidden, v.mlp_hidden, bias=True)
        self.fc2 = RowParallelLinear(v.mlp_hidden, v.hidden, bias=True)
        self.act = ACTIVATIONS[v.act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))  # type: ignore[no-any-return]


class VisionBlock(nn.Module):
    def __init__(self, v: VisionConfig) -> None:
        super().__init__()
        self.norm1, self.norm2 = self.make_norm(v.hidden), self.make_norm(v.hidden)
        self.attn = VisionAttention(v)
        self.mlp = self.make_mlp(v)

    @staticmethod
    def make_norm(dim: int) -> nn.Module:
        return nn.LayerNorm(dim, eps=1e-6)

    @staticmethod
    def make_mlp(v: VisionConfig) -> nn.Module:
        return VisionMLP(v)

    def forward(
        self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], bounds: list[int]
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos_sin, bounds)
        return x + self.mlp(self.norm2(x))  # type: ignore[no-any-return]


class PatchMerger(nn.Module):
    """Norm each patch, concatenate each merge x merge group (consecutive rows), then MLP."""

    def __init__(self, v: VisionConfig) -> None:
        super().__init__()
        self.group_dim = v.hidden * v.merge_size**2
        self.ln_q = self.make_norm(v.hidden)
        self.mlp = nn.Sequential(  # names mlp.0 / mlp.2 as in the checkpoint
            ColumnParallelLinear(self.group_dim, self.group_dim, bias=True),
            nn.GELU(),
            RowParallelLinear(self.group_dim, v.out_hidden, bias=True),
        )

    @staticmethod
    def make_norm(dim: int) -> nn.Module:
        return nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N / merge², out_hidden]."""
        return self.mlp(self.ln_q(x).view(-1, self.group_dim))  # type: ignore[no-any-return]


class VisionTransformer(nn.Module):
    block_cls: ClassVar[type[VisionBlock]] = VisionBlock
    merger_cls: ClassVar[type[PatchMerger]] = PatchMerger

    def __init__(self, v: VisionConfig) -> None:
        super().__init__()
        self.vcfg = v
        self.patch_embed = PatchEmbed(v)
        self.rotary = VisionRotary(v.head_dim, v.rope_theta)
        self.blocks = nn.ModuleList(self.block_cls(v) for _ in range(v.depth))
        self.merger = self.merger_cls(v)

    def forward(self, pixels: torch.Tensor, grids: list[list[int]]) -> torch.Tensor:
        """pixels [N, patch_dim] of all images, grids [t, h, w] each -> [N / merge², out]."""
        return run_stages(self.stages(self.patch_embed(pixels), grids))

    def stages(self, x: torch.Tensor, grids: list[list[int]]) -> EncoderStages:
        """forward from the patch embeddings x [N, hidden], a block at a time: yields N (the
        patch rows computed) between blocks, returns the output (the last stage is the last
        block and the merger)."""
        cos_sin = self.rotary(vision_positions(grids, self.vcfg.merge_size, x.device))
        bounds = frame_bounds(grids)
        for i, block in enumerate(self.blocks):
            if i:
                yield x.shape[0]
            x = block(x, cos_sin, bounds)
        return self.merger(x)  # type: ignore[no-any-return]


def qwen2_vl_vision_config(v: dict[str, Any]) -> VisionConfig:
    dim = int(v["embed_dim"])
    return VisionConfig(
        hidden=dim,
        mlp_hidden=int(dim * v.get("mlp_ratio", 4)),
        out_hidden=int(v["hidden_size"]),
        **VisionConfig.common(v),
    )


class Qwen2VLForConditionalGeneration(Qwen2ForCausalLM, EncodesImages, MRopePositions):  # type: ignore[misc,unused-ignore]
    # transformers v5 names -> ours (the older hub layout needs no renaming).
    checkpoint_prefixes: Sequence[tuple[str, str]] = [
        ("model.visual.", "visual."),
        ("model.language_model.", "model."),
    ]
    vision_cls: ClassVar[type[VisionTransformer]] = VisionTransformer

    def __init__(self, hf_config: dict[str, Any]) -> None:
        text = hf_config.get("text_config")
        if isinstance(text, dict) and hf_config.get("tie_word_embeddings"):
            # transformers ties when the top level says so, whatever text_config says.
            hf_config = {**hf_config, "text_config": {**text, "tie_word_embeddings": True}}
        super().__init__(hf_config)  # decoder (M-RoPE from make_rotary) and lm_head
        v = self.vision_config(hf_config["vision_config"])
        if v.out_hidden != self.config.hidden_size:
            raise ValueError(f"vision output {v.out_hidden} != hidden {self.config.hidden_size}")
        self.merge_size = v.merge_size
        self.visual = self.vision_cls(v)

    @staticmethod
    def vision_config(v: dict[str, Any]) -> VisionConfig:
        return qwen2_vl_vision_config(v)

    def make_rotary(self, cfg: DecoderConfig) -> RotaryEmbedding | None:
        section = cfg.rope_scaling.get("mrope_section")
        if not section:
            raise ValueError("Qwen2-VL config has no mrope_section")
        return MRotaryEmbedding(
            cfg.head_dim, cfg.max_positions, cfg.rope_theta, cfg.rope_scaling, list(section)
        )

    def encode_images(self, images: list[ImageInput]) -> list[torch.Tensor]:
        """One tower call over all images -> [num_tokens, hidden] each, in the model dtype."""
        return run_stages(self.encode_stages(images))

    def encode_stages(self, images: list[ImageInput]) -> Generator[int, None, list[torch.Tensor]]:
        """encode_images one tower block at a time (worker/encode_ahead.py): yields the patch
        rows each block computed."""
        grids = [[int(g) for g in img.grid] for img in images]
        for img, (t, h, w) in zip(images, grids, strict=True):
            tokens = t * h * w // self.merge_size**2
            if img.pixel_values.shape[0] != t * h * w or img.num_tokens != tokens:
                raise ValueError(
                    f"image grid {img.grid} does not fit {img.pixel_values.shape[0]} patches "
                    f"and {img.num_tokens} placeholder tokens"
                )
        x = torch.cat([self.embed_patches(img) for img in images])  # [N, hidden]
        stages: EncoderStages = self.visual.stages(x, grids)
        out = yield from stages
        return list(torch.split(out, [img.num_tokens for img in images]))

    def embed_patches(self, img: ImageInput) -> torch.Tensor:
        """[patches, hidden]: one image's patch embeddings, from the processor's compact still
        image (uint8 with pixel_scale/pixel_shift) or from normalized frames (videos)."""
        pixels = torch.from_numpy(img.pixel_values)
        embed: PatchEmbed = self.visual.patch_embed
        if img.pixel_scale:
            return embed.still(pixels, img.pixel_scale, img.pixel_shift)
        weight = embed.proj.weight
        return embed(pixels.to(weight.device, weight.dtype))  # type: ignore[no-any-return]

    def temporal_positions(self, t: int, second_per_grid_t: float) -> torch.Tensor:
        """[t] int64: the temporal M-RoPE index of each grid step (Qwen2-VL: the step)."""
        return torch.arange(t)

    def mrope_positions(
        self, prompt_ids: list[int], images: list[ImageInput]
    ) -> tuple[torch.Tensor, int]:
        """transformers' get_rope_index: text advances all three axes by one; an image's or
        video's tokens take (temporal index, row, column) of its merged grid plus the running
        position, and the text after it starts max(rows, columns) later (for a video too, as
        transformers does)."""
        parts: list[torch.Tensor] = []  # [3, n] each
        pos = at = 0  # next position, next token index
        for img in sorted(images, key=lambda i: i.offset):
            parts.append(torch.arange(pos, pos + img.offset - at).expand(3, -1))
            pos += img.offset - at
            t, h, w = (int(g) for g in img.grid)
            gh, gw = h // self.merge_size, w // self.merge_size
            grid = torch.meshgrid(
                self.temporal_positions(t, img.second_per_grid_t),
                torch.arange(gh),
                torch.arange(gw),
                indexing="ij",
            )
            parts.append(torch.stack(grid).reshape(3, -1) + pos)  # [3, t * gh * gw]
            pos += max(gh, gw)
            at = img.offset + img.num_tokens
        parts.append(torch.arange(pos, pos + len(prompt_ids) - at).expand(3, -1))
        positions = torch.cat(parts, dim=1)
        if positions.shape[1] != len(prompt_ids):
            raise ValueError("image spans do not fit the prompt")
        delta = int(positions.max()) + 1 - len(prompt_ids) if len(prompt_ids) else 0
        return positions, delta
