"""Qwen2.5-VL: Qwen2-VL with RMSNorm and a gated (SwiGLU-style, biased) MLP in the vision
tower, and window attention: all blocks but `fullatt_block_indexes` attend only within
windows of `window_size` pixels (in merged-patch units), so patches are reordered window by
window before the blocks and the merged outputs restored to image order after the merger.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from fovea.worker.layers import fused_cpu
from fovea.worker.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from fovea.worker.layers.norm import RMSNorm
from fovea.worker.models.base import EncoderStages
from fovea.worker.models.qwen2_vl import (
    ACTIVATIONS,
    PatchMerger,
    Qwen2VLForConditionalGeneration,
    VisionBlock,
    VisionConfig,
    VisionTransformer,
    frame_bounds,
    vision_positions,
)


class VisionRMSNorm(RMSNorm):  # type: ignore[misc,unused-ignore]
    """RMSNorm returning just the normed tensor (no fused residual)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override,unused-ignore]
        return super().forward(x)[0]  # type: ignore[no-any-return,unused-ignore]


class GatedVisionMLP(nn.Module):
    def __init__(self, v: VisionConfig) -> None:
        super().__init__()
        # gate_proj/up_proj load into gate_up_proj via the model's stacked_params_mapping.
        self.gate_up_proj = MergedColumnParallelLinear(v.hidden, [v.mlp_hidden] * 2, bias=True)
        self.down_proj = RowParallelLinear(v.mlp_hidden, v.hidden, bias=True)
        self.act = ACTIVATIONS[v.act]
        self.silu = v.act == "silu"  # the checkpoints' choice: one fused pass on CPU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # [N, 2 * mlp_hidden]
        if self.silu:
            return self.down_proj(fused_cpu.silu_mul(gate_up))  # type: ignore[no-any-return]
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)  # type: ignore[no-any-return]


class Qwen25VisionBlock(VisionBlock):  # type: ignore[misc,unused-ignore]
    @staticmethod
    def make_norm(dim: int) -> nn.Module:
        return VisionRMSNorm(dim, eps=1e-6)

    @staticmethod
    def make_mlp(v: VisionConfig) -> nn.Module:
        return GatedVisionMLP(v)


class Qwen25PatchMerger(PatchMerger):  # type: ignore[misc,unused-ignore]
    @staticmethod
    def make_norm(dim: int) -> nn.Module:
        return VisionRMSNorm(dim, eps=1e-6)


def window_order(
    grids: list[list[int]], merge: int, window: int, device: torch.device
) -> tuple[torch.Tensor, list[int]]:
    """(order [N / merge²]: merged-patch indices window by window — windows row-major over
    each frame, units row-major within a window, edge windows smaller — and the patch offsets
    where each window starts, plus the total). `window` is the side in merged patches."""
    order: list[torch.Tensor] = []
    bounds, base = [0], 0
    for t, h, w in grids:
        gh, gw = h // merge, w // merge
        units = torch.arange(base, base + t * gh * gw, device=device).view(t, gh, gw)
        for frame in units:
            for r in range(0, gh, window):
                for c in range(0, gw, window):
                    win = frame[r : r + window, c : c + window].flatten()
                    order.append(win)
                    bounds.append(bounds[-1] + win.numel() * merge * merge)
        base += t * gh * gw
    return torch.cat(order), bounds


class Qwen25VisionTransformer(VisionTransformer):  # type: ignore[misc,unused-ignore]
    block_cls: ClassVar[type[VisionBlock]] = Qwen25VisionBlock
    merger_cls: ClassVar[type[PatchMerger]] = Qwen25PatchMerger

    def stages(self, x: torch.Tensor, grids: list[list[int]]) -> EncoderStages:
        v = self.vcfg
        unit = v.merge_size**2  # patches per merged token, consecutive in every order
        window = v.window_size // v.merge_size // v.patch_size
        if window < 1:
            raise ValueError(f"window_size {v.window_size} is under one merged patch")
        n = x.shape[0]  # x [N, hidden]: patch embeddings, image order
        order, window_bounds = window_order(grids, v.merge_size, window, x.device)

        def to_windows(t: torch.Tensor) -> torch.Tensor:  # rows: image -> window order
            return t.view(n // unit, unit, *t.shape[1:])[order].reshape(t.shape)

        cos, sin = self.rotary(vision_positions(grids, v.merge_size, x.device))
        cos_sin = (to_windows(cos), to_windows(sin))
        x = to_windows(x)
        # Window order keeps each frame's patches contiguous, so frame bounds still hold.
        full_bounds = frame_bounds(grids)
        for i, block in enumerate(self.blocks):
            bounds = full_bounds if i in v.full_attention_blocks else window_bounds
            if i:
                yield n
            x = block(x, cos_sin, bounds)
        merged = self.merger(x)  # [N / unit, out], window order
        return merged[torch.argsort(order)]  # type: ignore[no-any-return,unused-ignore]


def qwen2_5_vl_vision_config(v: dict[str, Any]) -> VisionConfig:
    common = VisionConfig.common({"hidden_act": "silu", **v})
    return VisionConfig(
        hidden=int(v["hidden_size"]),
        mlp_hidden=int(v["intermediate_size"]),
        out_hidden=int(v["out_hidden_size"]),
        window_size=int(v["window_size"]),
        full_attention_blocks=tuple(int(i) for i in v.get("fullatt_block_indexes", ())),
        **common,
    )


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):  # type: ignore[misc,unused-ignore]
    vision_cls: ClassVar[type[VisionTransformer]] = Qwen25VisionTransformer

    def __init__(self, hf_config: dict[str, Any]) -> None:
        super().__init__(hf_config)
        self.tokens_per_second = int(hf_config["vision_config"].get("tokens_per_second", 4))

    def temporal_positions(self, t: int, second_per_grid_t: float) -> torch.Tensor:
        """A video's steps spaced by tokens_per_second * second_per_grid_t, truncated, in
        float32 as transformers computes it (its second_per_grid_ts is a float32 tensor)."""
        if second_per_grid_t <= 0:  # a still image
            return torch.arange(t)
        interval = self.tokens_per_second * torch.tensor(second_per_grid_t, dtype=torch.float32)
        return (torch.arange(t) * interval).long()

    @staticmethod
    def vision_config(v: dict[str, Any]) -> VisionConfig:
        return qwen2_5_vl_vision_config(v)
