"""LLaVA-NeXT's anyres feature packing (LLaVA-NeXT / 1.6, Llama3-LLaVA-NeXT, and
LLaVA-OneVision with its anyres_max downscaling), as transformers' `pack_image_features`.

An image arrives as a base tile (the whole image squashed to the tower's size) followed by the
tiles of its best-fit resolution, row-major. The tiles' patch features are laid out as one
grid, the rows or columns that only covered padding are cut (the image was fitted into the
grid's aspect and centred), the grid is optionally downscaled (anyres_max_N), and a learned
`image_newline` feature ends each row. The base tile's features come first.
The model is `LlavaForConditionalGeneration` (llava.py), which serves every LLaVA checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fovea.common.families.llava import (
    LlavaSpec,
    anyres_max_shape,
    select_best_resolution,
    unpadded_shape,
)


def pack_anyres(
    feats: torch.Tensor, height: int, width: int, spec: LlavaSpec, newline: torch.Tensor
) -> torch.Tensor:
    """feats [tiles, side², D] (projected; tile 0 the base) of an image of height x width
    pixels, newline [D] -> [num_tokens, D]. One tile only (OneVision with several images):
    the base features and one newline."""
    base = feats[0]  # [side², D]
    newline = newline.to(feats.dtype)
    if feats.shape[0] == 1:
        return torch.cat((base, newline[None]))
    side, dim = spec.patches_per_side, feats.shape[-1]
    best_h, best_w = select_best_resolution(height, width, spec.pinpoints)
    tiles_h, tiles_w = best_h // spec.image_size, best_w // spec.image_size
    if feats.shape[0] != 1 + tiles_h * tiles_w:
        raise ValueError(
            f"an image of {width}x{height} pixels takes 1 + {tiles_h}x{tiles_w} tiles, "
            f"got {feats.shape[0]}"
        )
    # [tiles_h, tiles_w, side, side, D] -> [D, tiles_h * side, tiles_w * side]
    grid = feats[1:].view(tiles_h, tiles_w, side, side, dim).permute(4, 0, 2, 1, 3)
    grid = grid.reshape(dim, tiles_h * side, tiles_w * side)
    rows, cols = unpadded_shape(tiles_h * side, tiles_w * side, height, width)
    top, left = (tiles_h * side - rows) // 2, (tiles_w * side - cols) // 2
    grid = grid[:, top : top + rows, left : left + cols]  # [D, rows, cols]
    if spec.max_tiles:
        small = anyres_max_shape(rows, cols, spec.max_tiles, side)
        if small != (rows, cols):
            grid = F.interpolate(grid[None], list(small), mode="bilinear")[0]
            rows, cols = small
    grid = torch.cat((grid, newline[:, None, None].expand(dim, rows, 1)), dim=-1)
    return torch.cat((base, grid.flatten(1, 2).transpose(0, 1)))  # [side² + rows*(cols+1), D]
