"""The demo VLM training's layout (bench/demo_vlm_layout.py), per-patch targets and output
layer: every image token has its own projector units, one per value of its attribute; the patch
targets count what is drawn; the output layer writes the codebook."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from fovea.bench.demo_vlm_data import SHAPES, picture
from fovea.bench.demo_vlm_layout import (
    SLOT_ATTR,
    SLOT_UNIT,
    SLOT_VALUES,
    SLOTS,
    UNITS,
    T,
    labels,
    own_units,
    unit_targets,
)
from fovea.bench.demo_vlm_train import Codebook, write_projector_output
from fovea.bench.demo_vlm_vision import GRID, patch_targets
from fovea.launcher.demo_vlm import IMAGE_TOKENS


def test_each_token_owns_a_run_of_units_one_per_value() -> None:
    assert len(SLOT_ATTR) == IMAGE_TOKENS == GRID * GRID
    assert SLOT_ATTR == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 4]
    assert SLOT_VALUES == [6, 6, 6, 6, 6, 6, 4, 4, 4, 5, 5, 5, 13, 13, 13, 13]
    assert SLOT_UNIT[:4] == [0, 6, 12, 18] and SLOT_UNIT[-1] + SLOT_VALUES[-1] == UNITS == 115
    own = own_units(576)
    assert own.sum(1).tolist() == SLOT_VALUES and own.sum(0).max() == 1


def test_labels_and_units_of_a_picture() -> None:
    pics = [picture("train", i) for i in range(40)]
    word = next(p for p in pics if p.word)
    shape = next(p for p in pics if p.shape and p.count == 3)
    assert labels(word)[0] == len(SHAPES) and labels(word)[4] == SLOTS[4][1].index(word.word)
    assert labels(shape)[2] == 2 and labels(shape)[3] == len(SLOTS[3][1]) - 1
    units = unit_targets([shape])[0]
    assert units[6:9].tolist() == [s + 2 for s in SLOT_UNIT[6:9]]
    assert bool(own_units(576)[torch.arange(16), units].all())


def test_patch_targets_count_every_centre_and_cover_only_what_is_drawn() -> None:
    pics = [picture("train", i, word_share=0.0) for i in range(30)]
    cover, kind, centres = patch_targets(pics)
    assert centres.sum(1).tolist() == [p.count for p in pics]
    for p, c, k in zip(pics, cover, kind, strict=True):
        assert set(k.tolist()) <= {SHAPES.index(str(p.shape)), len(SHAPES) + 1}
        assert bool(((c > 0.05) == (k != len(SHAPES) + 1)).all()) and 0 < float(c.max()) <= 1


def test_the_output_layer_writes_each_units_codebook_vector() -> None:
    """A one-hot of T on unit (slot, value) through write_projector_output's second layer
    gives exactly that slot's codebook vector for that value."""
    words = sorted({w for _, values, _ in SLOTS for w in values})

    def tok(word: str, add_special_tokens: bool) -> dict[str, list[int]]:
        return {"input_ids": [words.index(word), 0]}

    torch.manual_seed(0)
    book = Codebook(tok, torch.randn(len(words), 24))
    linear_2 = torch.nn.Linear(576, 24)
    model = SimpleNamespace(model=SimpleNamespace(
        multi_modal_projector=SimpleNamespace(linear_2=linear_2)
    ))  # fmt: skip
    write_projector_output(model, book)
    for i, value in [(0, 5), (4, 2), (9, 4), (15, 12)]:
        units = torch.zeros(576)
        units[SLOT_UNIT[i] + value] = T
        expected = book(torch.tensor([[value if a == SLOT_ATTR[i] else 0 for a in range(5)]]))
        assert torch.allclose(linear_2(units), expected[0, i], atol=1e-6)
    assert int((linear_2.weight != 0).any(0).sum()) == UNITS
