"""The demo VLM's image-token layout, shared by its training stages (bench/demo_vlm_train.py,
bench/demo_vlm_vision.py): which attribute each of a picture's 16 image tokens stands for, and
which of the projector's hidden units stand for each token's values."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from fovea.bench.demo_vlm_data import COLOURS, POSITIONS, SHAPES, WORDS, Picture
from fovea.launcher.demo_vlm import IMAGE_SIZE, IMAGE_TOKENS, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

_MEAN = np.array(OPENAI_CLIP_MEAN, dtype=np.float32)
_STD = np.array(OPENAI_CLIP_STD, dtype=np.float32)

# (attribute, its values as words, slots): the values' words seed the codebook; the last value
# of shape, position and word means "not shown".
SLOTS: tuple[tuple[str, tuple[str, ...], int], ...] = (
    ("shape", (*(s.capitalize() for s in SHAPES), "Text"), 3),
    ("colour", tuple(c.capitalize() for c in COLOURS), 3),
    ("count", ("1", "2", "3", "4"), 3),
    ("position", (*(p.capitalize() for p in POSITIONS), "None"), 3),
    ("word", (*WORDS, "None"), 4),
)
SLOT_ATTR = [a for a, (_, _, n) in enumerate(SLOTS) for _ in range(n)]  # token -> attribute
SLOT_VALUES = [len(SLOTS[a][1]) for a in SLOT_ATTR]
SLOT_UNIT = [sum(SLOT_VALUES[:i]) for i in range(len(SLOT_ATTR))]  # token -> first unit
UNITS = sum(SLOT_VALUES)  # the projector's hidden units that stand for a value; the rest idle
T = 8.0  # the one-hot's height: GELU(z) ~ z near +T
MARGIN = 2.0  # every other unit below -MARGIN: GELU(-2) = -0.045, a 0.6% leak of its column


def labels(pic: Picture) -> list[int]:
    """The value index of each attribute of SLOTS that `pic` shows."""
    return [
        SHAPES.index(pic.shape) if pic.shape else len(SHAPES),
        list(COLOURS).index(pic.colour),
        pic.count - 1,
        POSITIONS.index(pic.position) if pic.position else len(POSITIONS),
        WORDS.index(pic.word) if pic.word else len(WORDS),
    ]


def pixels(image: Image.Image) -> torch.Tensor:
    """[3, 64, 64]: what the processor makes of a square picture (bicubic resize, normalize)."""
    small = image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
    arr = (np.asarray(small, dtype=np.float32) / 255 - _MEAN) / _STD
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def schedule(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def unit_targets(pics: list[Picture]) -> torch.Tensor:
    """[N, IMAGE_TOKENS]: each token's projector unit, the one of its attribute's value."""
    values = torch.tensor([labels(p) for p in pics])  # [N, attributes]
    return values[:, SLOT_ATTR] + torch.tensor(SLOT_UNIT)


def own_units(units: int) -> torch.Tensor:
    """[IMAGE_TOKENS, units]: which of the projector's units stand for each token's values."""
    own = torch.zeros(IMAGE_TOKENS, units, dtype=torch.bool)
    for i, (first, n) in enumerate(zip(SLOT_UNIT, SLOT_VALUES, strict=True)):
        own[i, first : first + n] = True
    return own
