"""Weight layouts for CPU matmuls, chosen once after the checkpoint is loaded.

Every linear layer, the LM head included, keeps the plain weight re-laid column-major in place
(no copy; MKL's GEMV reads it in its fast direction, so a decode step's few rows run faster,
and MKL's GEMM is the fastest on many rows), and most keep a oneDNN-packed copy (one extra copy
of the weights), faster from PACKED_MIN_ROWS rows on and, on AVX2 CPUs, up to PACKED_MAX_ROWS.
Where that bound exists only the decoder's layers are packed (encoders_packed). A head tied to
the input embedding keeps a column-major copy too: the lookups need the row-major original.
Nothing here changes results beyond float rounding order. Measurements: docs/cpu.md.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from fovea.worker.cpu_threads import cpu_flags

log = logging.getLogger(__name__)

# From this many rows on a linear layer uses its oneDNN-packed weight: one on AVX-512 CPUs,
# four on AVX2 ones, where the column-major layout is faster for one to three rows
# (docs/cpu.md). Fixed per machine, so results never depend on a timing probe.
PACKED_MIN_ROWS = 1 if "avx512f" in cpu_flags() else 4
# From this many rows on the column-major layout is used again: on AVX2 CPUs MKL's GEMM beat the
# packed weights by 5-20% from 256-512 rows on (fp32, docs/cpu.md). Not measured on AVX-512 CPUs:
# there the packed weights serve every row count, as before.
PACKED_MAX_ROWS: int | None = None if "avx512f" in cpu_flags() else 256
# The batch size oneDNN's packing is tuned for (a decode batch of a loaded server).
PACK_HINT_ROWS = 32


def column_major(w: torch.Tensor) -> torch.Tensor:
    """The same [out, in] matrix, stored with the input dimension outermost."""
    return w.t().contiguous().t()


def onednn_pack(w: torch.Tensor) -> torch.Tensor | None:
    """w [out, in] packed for torch's oneDNN linear, or None where this torch has none."""
    try:
        packed: torch.Tensor = torch.ops.mkldnn._reorder_linear_weight(w, PACK_HINT_ROWS)
        probe = torch.zeros(4, w.shape[1], dtype=w.dtype)
        torch.ops.mkldnn._linear_pointwise(probe, packed, None, "none", [], "")
        return packed
    except (RuntimeError, AttributeError) as e:
        log.info("oneDNN packed linear unavailable (%s): plain matmul for the LM head", e)
        return None


def packed_rows(rows: int) -> bool:
    """Whether a matmul of this many rows uses the oneDNN-packed weight."""
    return rows >= PACKED_MIN_ROWS and (PACKED_MAX_ROWS is None or rows < PACKED_MAX_ROWS)


def encoders_packed() -> bool:
    """Whether the layers outside the decoder (vision towers, projectors) get a packed copy.
    Their inputs are an image's patch rows, hundreds to thousands, so where PACKED_MAX_ROWS
    bounds the packed copy they would hardly use it (Qwen2.5-VL-3B's tower in float32: 2.2 GB
    of copies)."""
    return PACKED_MAX_ROWS is None


class CpuWeights:
    """A linear layer's two CPU layouts: `linear(x, b)` == F.linear(x, w, b) for x [..., in]."""

    def __init__(self, w: torch.Tensor, pack: bool = True) -> None:
        """pack: False leaves out the packed copy (every row count takes the column-major one)."""
        self.col = column_major(w)  # w itself when w is already column-major
        self.packed = onednn_pack(w) if pack else None

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if self.packed is not None and packed_rows(rows.shape[0]):
            out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
                rows.contiguous(), self.packed, bias, "none", [], ""
            )
            return out.view(*x.shape[:-1], out.shape[-1])
        return F.linear(x, self.col, bias)
