"""Weight layouts for CPU matmuls, chosen once after the checkpoint is loaded.

Measured here (fp32, one thread, SmolLM2-135M's shapes, interleaved runs in one process):
- `F.linear(x, W)` with W [out, in] stored column-major (W.t() contiguous) runs a decode step's
  few rows 1.1-1.8x faster than the checkpoint's row-major layout (MKL's GEMV reads the
  weight in its fast direction) and as fast from 32 rows on; a whole decode step of one
  sequence 0.77x the time. Same bytes, so every linear layer takes it.
- The LM head (vocabulary-wide, 49k x 576) is the one exception: from a few rows on, oneDNN
  on a weight pre-packed for its blocking is 1.3-1.5x faster than either plain layout, while
  for one or two rows the column-major layout is. The head keeps both: its packed copy is one
  extra copy of its weight; the column-major one is a second only when the head is tied to the
  input embedding, whose lookups need the row-major original.
Nothing here changes results beyond float rounding order.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

# From this many rows on the LM head uses the oneDNN-packed weight.
PACKED_MIN_ROWS = 4
# The batch size oneDNN's packing is tuned for (a decode batch of a loaded server).
PACK_HINT_ROWS = 32


def column_major(w: torch.Tensor) -> torch.Tensor:
    """The same [out, in] matrix, stored with the input dimension outermost."""
    return w.t().contiguous().t()


def onednn_pack(w: torch.Tensor) -> torch.Tensor | None:
    """w [out, in] packed for torch's oneDNN linear, or None where this torch has none."""
    try:
        packed: torch.Tensor = torch.ops.mkldnn._reorder_linear_weight(w, PACK_HINT_ROWS)
        probe = torch.zeros(PACKED_MIN_ROWS, w.shape[1], dtype=w.dtype)
        torch.ops.mkldnn._linear_pointwise(probe, packed, None, "none", [], "")
        return packed
    except (RuntimeError, AttributeError) as e:
        log.info("oneDNN packed linear unavailable (%s): plain matmul for the LM head", e)
        return None


class CpuHeadWeights:
    """The LM head's two CPU layouts: `linear(x)` == F.linear(x, w) for x [n, in]."""

    def __init__(self, w: torch.Tensor) -> None:
        self.col = column_major(w)  # w itself when w is already column-major
        self.packed = onednn_pack(w)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and x.shape[0] >= PACKED_MIN_ROWS:
            out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
                x.contiguous(), self.packed, None, "none", [], ""
            )
            return out
        return F.linear(x, self.col)


def prepare_for_cpu(model: nn.Module) -> None:
    """Re-lay every tensor-parallel linear weight column-major and give LM heads their CPU
    layouts. Call after the weights are loaded (loaders write the row-major layout)."""
    from fovea.worker.layers.embedding import ParallelLMHead, VocabParallelEmbedding
    from fovea.worker.layers.linear import _ParallelLinear

    # A head tied to the input embedding must leave that weight row-major (embedding lookups
    # read rows); an untied head's own weight is re-laid in place, so its column-major layout
    # costs no copy.
    embeddings = {
        m.weight.data_ptr()
        for m in model.modules()
        if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead)
    }
    for m in model.modules():
        if isinstance(m, _ParallelLinear):
            m.weight.data = column_major(m.weight.data)
        elif isinstance(m, ParallelLMHead):
            if m.weight.data_ptr() not in embeddings:
                m.weight.data = column_major(m.weight.data)
            m.cpu_weights = CpuHeadWeights(m.weight.data)
