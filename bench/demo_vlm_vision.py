"""Stage V of the demo VLM's training (bench/demo_vlm_train.py): the CLIP tower and the
projector's first layer classify each image token's attribute from pixels."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from fovea.bench.demo_vlm_data import SHAPES, Picture, picture
from fovea.bench.demo_vlm_layout import (
    MARGIN,
    SLOT_ATTR,
    SLOTS,
    UNITS,
    T,
    own_units,
    pixels,
    schedule,
    unit_targets,
)
from fovea.launcher.demo_vlm import IMAGE_SIZE, PATCH_SIZE


def tower_features(model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """[N, IMAGE_TOKENS, hidden]: the tower's last hidden state without CLS, as LLaVA selects
    it (vision_feature_layer -1, strategy "default")."""
    out = model.model.vision_tower(pixel_values, output_hidden_states=True)
    feats: torch.Tensor = out.hidden_states[-1][:, 1:]
    return feats


def unit_logits(model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """[N, IMAGE_TOKENS, units]: the projector's first layer on the tower's features."""
    z: torch.Tensor = model.model.multi_modal_projector.linear_1(
        tower_features(model, pixel_values)
    )
    return z


GRID = IMAGE_SIZE // PATCH_SIZE  # patches a side; token r * GRID + c is row r, column c
PATCH_CLASSES = len(SHAPES) + 2  # a shape, printed text, or nothing (< 5% covered)


def patch_targets(pics: list[Picture]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per patch of each picture: the share its shapes or word cover [N, P], what covers it
    [N, P] (a shape index, len(SHAPES) for text, len(SHAPES) + 1 for nothing) and how many
    shape centres lie in it [N, P]."""
    cover, kind, centres = [], [], []
    for p in pics:
        assert p.mask is not None
        m = np.asarray(p.mask.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX), np.float32)
        share = m.reshape(GRID, PATCH_SIZE, GRID, PATCH_SIZE).mean((1, 3)).ravel() / 255
        what = SHAPES.index(p.shape) if p.shape else len(SHAPES)
        n = np.zeros(GRID * GRID, np.int64)
        for x, y in p.centres:
            col, row = (min(GRID - 1, int(v / p.image.width * GRID)) for v in (x, y))
            n[row * GRID + col] += 1
        cover.append(share)
        kind.append(np.where(share > 0.05, what, len(SHAPES) + 1))
        centres.append(n)
    return (
        torch.from_numpy(np.stack(cover)),
        torch.from_numpy(np.stack(kind)),
        torch.from_numpy(np.stack(centres)),
    )


def sincos_positions(model: Any, scale: float = 0.5) -> None:
    """Starts the tower's learned position embeddings as 2-D sines and cosines (rows in the
    first half of the width, columns in the second; CLS at zero): learning them from nothing
    costs the small tower most of its pictures."""
    table = model.model.vision_tower.embeddings.position_embedding.weight
    width = table.shape[1] // 4
    freq = 1.0 / 100.0 ** (torch.arange(width) / width)
    grid = torch.arange(GRID, dtype=torch.float32)
    rows, cols = grid.repeat_interleave(GRID), grid.repeat(GRID)
    parts = [f(v[:, None] * freq) for v in (rows, cols) for f in (torch.sin, torch.cos)]
    with torch.no_grad():
        table.zero_()
        table[1:, : 4 * width] = scale * torch.cat(parts, dim=1)


def train_vision(model: Any, args: argparse.Namespace, log: Any) -> None:
    """Stage V: each token's own units classify its attribute (cross-entropy); the chosen unit
    is pulled to T and every other unit that the second layer reads pushed below -MARGIN (squared
    hinges); the units beyond UNITS have zero columns."""
    units = model.model.multi_modal_projector.linear_1.out_features
    own = own_units(units)
    used = torch.arange(units) < UNITS
    if args.v_init is None:
        sincos_positions(model)
    else:  # a longer run goes on from an earlier one's classifier
        from safetensors.torch import load_file

        model.load_state_dict(load_file(args.v_init), strict=False)
    hidden = model.model.vision_tower.config.hidden_size
    # Per-patch side tasks (cover, what covers it, centres), read off the same hidden state;
    # this head is not saved. Their gradients teach the tower local shape features first.
    aux = nn.Linear(hidden, 1 + PATCH_CLASSES + 5)
    params = [
        *model.model.vision_tower.parameters(),
        *model.model.multi_modal_projector.linear_1.parameters(),
        *aux.parameters(),
    ]
    opt = torch.optim.AdamW(params, lr=args.v_lr, weight_decay=0.01)
    index = args.v_first
    for step in range(args.v_steps):
        pics = [picture("train", 10_000_000 + index + i) for i in range(args.v_batch)]
        index += args.v_batch
        target = unit_targets(pics)  # [B, 16]
        feats = tower_features(model, torch.stack([pixels(p.image) for p in pics]))
        z = model.model.multi_modal_projector.linear_1(feats)  # [B, 16, units]
        side = aux(feats)  # [B, 16, 1 + PATCH_CLASSES + 5]
        cover, kind, centres = patch_targets(pics)
        side_loss = (
            F.mse_loss(side[..., 0], cover) * 10
            + F.cross_entropy(side[..., 1 : 1 + PATCH_CLASSES].flatten(0, 1), kind.flatten())
            + F.cross_entropy(side[..., 1 + PATCH_CLASSES :].flatten(0, 1), centres.flatten())
        )
        ce = F.cross_entropy(z.masked_fill(~own, -1e4).flatten(0, 1), target.flatten())
        chosen = F.one_hot(target, units).bool()
        high = (z[chosen] - T).square().mean()
        others = used & ~chosen  # every unit but the chosen one that a column reads
        low = F.relu(z + MARGIN).masked_fill(~others, 0).square().sum(-1).mean() / units
        loss = ce + 0.2 * high + args.v_low * low + side_loss
        for g in opt.param_groups:
            g["lr"] = schedule(step, args.v_steps, args.v_lr, warmup=100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 500 == 499:  # a run cut short keeps its progress
            save_vision(model, args.work / "classifier.safetensors", torch.float32)
        if step % 100 == 0 or step == args.v_steps - 1:
            log({"stage": "V", "step": step, "ce": round(ce.item(), 4),
                 "side": round(side_loss.item(), 4),
                 "high": round(high.item(), 3), "low": round(low.item(), 3),
                 "check": vision_accuracy(model, 256)})  # fmt: skip


def vision_accuracy(model: Any, n: int) -> dict[str, float]:
    """Per attribute, how often every one of its slots picks the right value, on pictures of
    split "v-check" (neither trained on nor the eval split)."""
    pics = [picture("v-check", i) for i in range(n)]
    with torch.no_grad():
        z = unit_logits(model, torch.stack([pixels(p.image) for p in pics]))
    target = unit_targets(pics)  # [n, 16]
    right = z.masked_fill(~own_units(z.shape[-1]), -1e4).argmax(-1) == target
    high = z.gather(-1, target[..., None]).squeeze(-1) > 0.8 * T
    z[..., UNITS:] = -T  # units no column reads
    z.scatter_(-1, target[..., None], -T)
    off = (z < 0).all(-1)  # every other unit's GELU is within -0.17 of 0
    attr = torch.tensor(SLOT_ATTR)
    return {
        name: round(float(right[:, attr == a].all(-1).float().mean()), 3)
        for a, (name, _, _) in enumerate(SLOTS)
    } | {
        "above_0.8T": round(float(high.float().mean()), 3),
        "others_off": round(float(off.float().mean()), 3),
    }


def save_vision(model: Any, out: Path, dtype: torch.dtype = torch.bfloat16) -> None:
    from safetensors.torch import save_file

    state = {
        k: v.detach().to(dtype).contiguous()
        for k, v in model.state_dict().items()
        if k.startswith(("model.vision_tower.", "model.multi_modal_projector."))
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata={"format": "pt"})
