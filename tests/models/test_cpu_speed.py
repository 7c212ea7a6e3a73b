"""CPU-only speed measures must not change results: the column-major weights, the LM head's
packed copy, and the automatic thread count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fovea.common.config import ServerArgs, check_args
from fovea.worker.cpu_threads import auto_threads, set_cpu_threads
from fovea.worker.layers import cpu_layout
from fovea.worker.layers.cpu_layout import (
    CpuWeights,
    column_major,
    onednn_pack,
    packed_rows,
)
from fovea.worker.layers.embedding import ParallelLMHead
from fovea.worker.layers.linear import ColumnParallelLinear, RowParallelLinear
from fovea.worker.loader import prepare_for_cpu


def test_column_major_is_the_same_matrix_stored_transposed() -> None:
    w = torch.arange(12, dtype=torch.float32).view(3, 4)
    c = column_major(w)
    assert c.shape == (3, 4) and c.stride() == (1, 3)
    assert torch.equal(c, w)


@pytest.mark.parametrize("min_rows", [1, 4])
@pytest.mark.parametrize("rows", [1, 3, 4, 33])
def test_head_weights_give_the_plain_product(
    rows: int, min_rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both layouts, whichever this CPU picks for how many rows (PACKED_MIN_ROWS)."""
    monkeypatch.setattr(cpu_layout, "PACKED_MIN_ROWS", min_rows)
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(1000, 64, generator=g)
    x = torch.randn(rows, 64, generator=g)
    head = CpuWeights(w)
    assert head.packed is not None  # torch's CPU wheels ship oneDNN: the packed path is tested
    out = head.linear(x)
    assert out.shape == (rows, 1000)
    torch.testing.assert_close(out, F.linear(x, w), rtol=1e-5, atol=1e-4)


def test_packed_weights_serve_rows_from_min_up_to_max(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_layout, "PACKED_MIN_ROWS", 4)
    monkeypatch.setattr(cpu_layout, "PACKED_MAX_ROWS", 256)
    assert [packed_rows(n) for n in (1, 3, 4, 255, 256, 3996)] == [
        False,
        False,
        True,
        True,
        False,
        False,
    ]
    monkeypatch.setattr(cpu_layout, "PACKED_MAX_ROWS", None)  # AVX-512 CPUs: no upper bound
    assert [packed_rows(n) for n in (3, 4, 3996)] == [False, True, True]


@pytest.mark.parametrize(("rows", "packed"), [(3, False), (4, True), (255, True), (256, False)])
def test_each_row_count_takes_its_layout(
    rows: int, packed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The packed copy is made of 2 * w here, so the output says which layout computed it."""
    monkeypatch.setattr(cpu_layout, "PACKED_MIN_ROWS", 4)
    monkeypatch.setattr(cpu_layout, "PACKED_MAX_ROWS", 256)
    w = torch.randn(48, 32, generator=torch.Generator().manual_seed(1))
    layouts = CpuWeights(w)
    layouts.packed = onednn_pack(2 * w)
    x = torch.randn(rows, 32, generator=torch.Generator().manual_seed(2))
    expected = F.linear(x, 2 * w if packed else w)
    torch.testing.assert_close(layouts.linear(x), expected, rtol=1e-5, atol=1e-4)


def test_prepare_for_cpu_keeps_every_output(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_layout, "PACKED_MAX_ROWS", None)  # packed copies outside `model` too
    torch.manual_seed(0)
    model = torch.nn.ModuleDict(
        {
            "up": ColumnParallelLinear(32, 48, bias=True),
            "down": RowParallelLinear(48, 32, bias=True),
            "head": ParallelLMHead(100, 32),
        }
    )
    for p in model.parameters():
        p.data.normal_()

    def run() -> torch.Tensor:
        # 6 rows take the packed layouts, 2 the column-major ones; [2, 3, 32]: a 3-D input
        outs = []
        for x in (xs, xs[:2], xs[:6].view(2, 3, 32)):
            h = model["down"](model["up"](x))
            outs.append(model["head"](h.reshape(-1, 32)).flatten())
        return torch.cat(outs)

    xs = torch.randn(6, 32)
    before = run()
    prepare_for_cpu(model)
    assert model["up"].weight.stride() == (1, 48)
    assert model["down"].weight.stride() == (1, 32)
    for name in ("up", "down"):  # both layouts: the weight itself, re-laid, and a packed copy
        layouts = model[name].cpu_weights
        assert isinstance(layouts, CpuWeights) and layouts.packed is not None
        assert layouts.col.data_ptr() == model[name].weight.data_ptr()
    head = model["head"].cpu_weights
    assert isinstance(head, CpuWeights)
    # An untied head is re-laid in place: its column-major matrix is its own weight, no copy.
    assert head.col.data_ptr() == model["head"].weight.data_ptr()
    torch.testing.assert_close(run(), before, rtol=1e-5, atol=1e-4)


def test_a_tied_head_leaves_the_embedding_row_major() -> None:
    from fovea.worker.layers.embedding import VocabParallelEmbedding

    model = torch.nn.ModuleDict(
        {"embed": VocabParallelEmbedding(100, 32), "head": ParallelLMHead(100, 32)}
    )
    model["embed"].weight.data.normal_()
    model["head"].weight = model["embed"].weight
    ids = torch.tensor([3, 99, 0])
    x = torch.randn(2, 32)
    rows, logits = model["embed"](ids), model["head"](x)
    prepare_for_cpu(model)
    assert model["embed"].weight.stride() == (32, 1)
    head = model["head"].cpu_weights
    assert head is not None and head.col.data_ptr() != model["embed"].weight.data_ptr()
    assert torch.equal(model["embed"](ids), rows)
    torch.testing.assert_close(model["head"](x), logits, rtol=1e-5, atol=1e-4)


def test_auto_threads_keeps_a_cpu_for_the_front_end_from_three_on() -> None:
    assert [auto_threads(n) for n in (1, 2, 3, 4, 16)] == [1, 2, 2, 3, 15]


def test_auto_threads_share_the_cpus_among_local_ranks() -> None:
    assert [auto_threads(2, r) for r in (1, 2, 3)] == [2, 1, 1]
    assert [auto_threads(16, r) for r in (1, 2, 4, 8)] == [15, 7, 3, 1]


def test_set_cpu_threads_applies_the_request() -> None:
    old = torch.get_num_threads()
    try:
        assert set_cpu_threads(1) == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(old)


def test_negative_cpu_threads_is_refused() -> None:
    assert check_args(ServerArgs(model_path="m", cpu_threads=-1)) == (
        "--cpu-threads must be >= 0, got -1"
    )


@pytest.mark.parametrize(("max_rows", "encoder_packed"), [(256, False), (None, True)])
def test_only_the_decoder_is_packed_where_packing_has_a_row_bound(
    max_rows: int | None, encoder_packed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Layers outside `model` (vision towers, projectors) compute hundreds of patch rows; where
    MKL takes over from PACKED_MAX_ROWS rows they keep no packed copy."""
    monkeypatch.setattr(cpu_layout, "PACKED_MAX_ROWS", max_rows)
    torch.manual_seed(0)
    model = torch.nn.ModuleDict(
        {
            "model": torch.nn.ModuleDict({"up": ColumnParallelLinear(32, 48, bias=False)}),
            "visual": torch.nn.ModuleDict({"fc": RowParallelLinear(48, 32, bias=True)}),
        }
    )
    for p in model.parameters():
        p.data.normal_()
    x = torch.randn(8, 48)
    before = model["visual"]["fc"](x)
    prepare_for_cpu(model)
    decoder, encoder = model["model"]["up"].cpu_weights, model["visual"]["fc"].cpu_weights
    assert decoder is not None and decoder.packed is not None
    assert encoder is not None and (encoder.packed is not None) == encoder_packed
    torch.testing.assert_close(model["visual"]["fc"](x), before, rtol=1e-5, atol=1e-4)
