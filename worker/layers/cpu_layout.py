"""Weight layouts for CPU matmuls, chosen once after the checkpoint is loaded.

Measured here (fp32, one thread, SmolLM2-135M's shapes, interleaved runs in one process):
- `F.linear(x, W)` with W [out, in] stored column-major (W.t() contiguous) runs a decode step's
  few rows 1.1-1.8x faster than the checkpoint's row-major layout (MKL's GEMV reads the
  weight in its fast direction) and as fast from 32 rows on; a whole decode step of one
  sequence 0.77x the time. Same bytes, so every linear layer takes it.
- The LM head (vocabulary-wide, 49k x 576): from a few rows on, oneDNN on a weight pre-packed
  for its blocking is 1.3-1.5x faster than either plain layout, while for one or two rows the
  column-major layout is.
Measured on an AVX-512 (avx512_bf16) AMD EPYC, 2 threads, the four linear layers of one
SmolLM2 block at 32 rows: oneDNN packed 316 us against 409 column-major in bf16, 569 against
1,477 in fp32 (at 1 row 120 against 207 in bf16). So every linear layer, the head included,
keeps both layouts (CpuWeights): the plain weight re-laid column-major in place (no copy), and
a packed copy, one extra copy of the weights, used from PACKED_MIN_ROWS rows on (1 on AVX-512
CPUs, 4 elsewhere). A head tied to the input embedding keeps a column-major copy too: the
lookups need the row-major original.
Nothing here changes results beyond float rounding order.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from fovea.worker.cpu_threads import cpu_flags

log = logging.getLogger(__name__)

# From this many rows on a linear layer uses its oneDNN-packed weight: from one row on AVX-512
# CPUs (packed 120 against 207 us column-major above, bf16; 143 against 177 fp32), from four
# on AVX2 ones, where the column-major layout was faster for one to three rows. Fixed per
# machine, so one machine's results never depend on a timing probe.
PACKED_MIN_ROWS = 1 if "avx512f" in cpu_flags() else 4
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


class CpuWeights:
    """A linear layer's two CPU layouts: `linear(x, b)` == F.linear(x, w, b) for x [..., in]."""

    def __init__(self, w: torch.Tensor) -> None:
        self.col = column_major(w)  # w itself when w is already column-major
        self.packed = onednn_pack(w)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if self.packed is not None and rows.shape[0] >= PACKED_MIN_ROWS:
            out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
                rows.contiguous(), self.packed, bias, "none", [], ""
            )
            return out.view(*x.shape[:-1], out.shape[-1])
        return F.linear(x, self.col, bias)
